// The pipeline executor over real rank threads and real messages: it computes the gradients of
// the same model run on one rank (PP ∈ {2, 4}, VPP ∈ {1, 2}, a weight tied between the first and
// the last stage, with and without data parallelism); its logical clock measures the bubble of
// the formula (1F1B) and of the simulation (interleaved); and a stage that throws in a forward or
// a backward, or returns before its step, fails the world at once instead of leaving the other
// stages waiting, every stage's error naming the failing rank.
//
// Rank threads never assert (Catch2 v2 is not thread-safe): they store what they computed, and
// the main thread compares.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <map>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/pipeline/executor.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/pipeline/simulation.hpp"
#include "support/catch.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;

namespace {

constexpr std::chrono::milliseconds kTimeout = std::chrono::seconds(20);

// ---- the model ----------------------------------------------------------------------------
// Microbatch mb's data d (D values) enters through a weight E (H×D): h = E·d. Then L layers
// y = tanh(W·x + b) of width H. The output goes back through the same E: z = Eᵀ·y, and the loss
// is ½‖z − t‖². E is tied: the first virtual stage and the last one each hold a copy.

constexpr std::size_t kWidth = 4;  // H
constexpr std::size_t kData = 3;   // D

template <class T>
struct Params {
  std::vector<std::vector<T>> w;  // per layer, H×H row-major
  std::vector<std::vector<T>> b;  // per layer, H
  std::vector<T> e;               // the tied weight, H×D row-major

  static Params initial(int layers) {
    Params p = zeros(layers);
    for (int l = 0; l < layers; ++l) {
      for (std::size_t i = 0; i < kWidth * kWidth; ++i)
        p.w[l][i] = static_cast<T>(0.7 * std::sin(0.37 * double(i) + 1.1 * l + 0.2));
      for (std::size_t i = 0; i < kWidth; ++i)
        p.b[l][i] = static_cast<T>(0.1 * std::cos(0.9 * double(i) - 0.5 * l));
    }
    for (std::size_t i = 0; i < kWidth * kData; ++i)
      p.e[i] = static_cast<T>(0.6 * std::sin(0.7 * double(i) + 0.3));
    return p;
  }
  static Params zeros(int layers) {
    auto const n = static_cast<std::size_t>(layers);
    return {std::vector<std::vector<T>>(n, std::vector<T>(kWidth * kWidth)),
            std::vector<std::vector<T>>(n, std::vector<T>(kWidth)), std::vector<T>(kWidth * kData)};
  }
};

template <class T>
T input(int mb, std::size_t j) {
  return static_cast<T>(std::cos(0.5 * mb + 0.9 * double(j)));
}
template <class T>
T target(int mb, std::size_t j) {
  return static_cast<T>(0.4 * std::sin(0.3 * mb - 0.4 * double(j) + 1.0));
}

// y = tanh(W·x + b) for layer l.
template <class T>
std::vector<T> layer_forward(Params<T> const& p, int l, std::vector<T> const& x) {
  std::vector<T> y(kWidth);
  for (std::size_t i = 0; i < kWidth; ++i) {
    T s = p.b[l][i];
    for (std::size_t j = 0; j < kWidth; ++j) s += p.w[l][i * kWidth + j] * x[j];
    y[i] = std::tanh(s);
  }
  return y;
}
// Accumulates layer l's gradients into g; returns dx.
template <class T>
std::vector<T> layer_backward(Params<T> const& p, Params<T>& g, int l, std::vector<T> const& x,
                              std::vector<T> const& y, std::vector<T> const& dy) {
  std::vector<T> dx(kWidth, T(0));
  for (std::size_t i = 0; i < kWidth; ++i) {
    T const d = dy[i] * (T(1) - y[i] * y[i]);
    g.b[l][i] += d;
    for (std::size_t j = 0; j < kWidth; ++j) {
      g.w[l][i * kWidth + j] += d * x[j];
      dx[j] += p.w[l][i * kWidth + j] * d;
    }
  }
  return dx;
}
// h = E·d
template <class T>
std::vector<T> embed(Params<T> const& p, int mb) {
  std::vector<T> h(kWidth, T(0));
  for (std::size_t i = 0; i < kWidth; ++i)
    for (std::size_t j = 0; j < kData; ++j) h[i] += p.e[i * kData + j] * input<T>(mb, j);
  return h;
}
template <class T>
void embed_backward(Params<T>& g, int mb, std::vector<T> const& dh) {
  for (std::size_t i = 0; i < kWidth; ++i)
    for (std::size_t j = 0; j < kData; ++j) g.e[i * kData + j] += dh[i] * input<T>(mb, j);
}
// z = Eᵀ·y − t
template <class T>
std::vector<T> residual(Params<T> const& p, int mb, std::vector<T> const& y) {
  std::vector<T> r(kData);
  for (std::size_t j = 0; j < kData; ++j) {
    T z = 0;
    for (std::size_t i = 0; i < kWidth; ++i) z += p.e[i * kData + j] * y[i];
    r[j] = z - target<T>(mb, j);
  }
  return r;
}
template <class T>
T head_loss(Params<T> const& p, int mb, std::vector<T> const& y) {
  T loss = 0;
  for (T r : residual(p, mb, y)) loss += T(0.5) * r * r;
  return loss;
}
// Accumulates E's gradient from the loss (scaled by dloss); returns dy.
template <class T>
std::vector<T> head_backward(Params<T> const& p, Params<T>& g, int mb, std::vector<T> const& y,
                             T dloss) {
  auto const r = residual(p, mb, y);
  std::vector<T> dy(kWidth, T(0));
  for (std::size_t i = 0; i < kWidth; ++i)
    for (std::size_t j = 0; j < kData; ++j) {
      g.e[i * kData + j] += y[i] * dloss * r[j];
      dy[i] += p.e[i * kData + j] * dloss * r[j];
    }
  return dy;
}

// The single-rank computation: every layer on one rank, microbatches first_mb … first_mb+count−1
// one after the other. Accumulates into g and returns the loss sum.
template <class T>
T reference_step(Params<T> const& p, Params<T>& g, int first_mb, int count) {
  int const layers = static_cast<int>(p.w.size());
  T loss = 0;
  for (int mb = first_mb; mb < first_mb + count; ++mb) {
    std::vector<std::vector<T>> acts{embed(p, mb)};
    for (int l = 0; l < layers; ++l) acts.push_back(layer_forward(p, l, acts.back()));
    loss += head_loss(p, mb, acts.back());
    auto dy = head_backward(p, g, mb, acts.back(), T(1));
    for (int l = layers - 1; l >= 0; --l) dy = layer_backward(p, g, l, acts[l], acts[l + 1], dy);
    embed_backward(g, mb, dy);
  }
  return loss;
}

// One PP rank's share of the model: chunk c runs the `per_chunk` layers of virtual stage
// c·PP + stage. Keeps every layer's parameters (only its own are used) so gradients compare by
// global layer index.
template <class T>
class MlpStage {
 public:
  using value_type = T;

  MlpStage(Params<T> params, int stages, int chunks, int stage, int per_chunk, int first_mb)
      : p_(std::move(params)),
        g_(Params<T>::zeros(static_cast<int>(p_.w.size()))),
        stages_(stages),
        chunks_(chunks),
        stage_(stage),
        per_chunk_(per_chunk),
        first_mb_(first_mb) {}

  std::size_t activation_size() const { return kWidth; }

  void forward(int mb, int chunk, std::span<T const> in, std::span<T> out) {
    int const v = chunk * stages_ + stage_;
    auto& acts = stash_[{mb, chunk}];
    acts.push_back(v == 0 ? embed(p_, first_mb_ + mb) : std::vector<T>(in.begin(), in.end()));
    for (int l = v * per_chunk_; l < (v + 1) * per_chunk_; ++l)
      acts.push_back(layer_forward(p_, l, acts.back()));
    if (v == stages_ * chunks_ - 1)
      out[0] = head_loss(p_, first_mb_ + mb, acts.back());
    else
      std::copy(acts.back().begin(), acts.back().end(), out.begin());
  }

  void backward(int mb, int chunk, std::span<T const> out_grad, std::span<T> in_grad) {
    int const v = chunk * stages_ + stage_;
    auto const acts = std::move(stash_.at({mb, chunk}));
    stash_.erase({mb, chunk});
    std::vector<T> dy = v == stages_ * chunks_ - 1
                            ? head_backward(p_, g_, first_mb_ + mb, acts.back(), out_grad[0])
                            : std::vector<T>(out_grad.begin(), out_grad.end());
    for (int j = per_chunk_ - 1; j >= 0; --j)
      dy = layer_backward(p_, g_, v * per_chunk_ + j, acts[j], acts[j + 1], dy);
    if (v == 0)
      embed_backward(g_, first_mb_ + mb, dy);
    else
      std::copy(dy.begin(), dy.end(), in_grad.begin());
  }

  Params<T>& grads() { return g_; }
  /// The global layers this rank runs.
  std::vector<int> layers() const {
    std::vector<int> out;
    for (int c = 0; c < chunks_; ++c)
      for (int j = 0; j < per_chunk_; ++j) out.push_back((c * stages_ + stage_) * per_chunk_ + j);
    return out;
  }
  bool stash_empty() const { return stash_.empty(); }

 private:
  Params<T> p_, g_;
  int stages_, chunks_, stage_, per_chunk_, first_mb_;
  std::map<std::pair<int, int>, std::vector<std::vector<T>>> stash_;
};

static_assert(PipelineStageModel<MlpStage<double>>);
static_assert(PipelineStageModel<MlpStage<float>>);

// What one rank computed, read on the main thread.
template <class T>
struct StageOutcome {
  Params<T> grads;
  std::vector<int> layers;
  bool holds_tied = false;
  PipelineStepResult<T> step;
  bool stash_empty = false;
};

double max_abs(std::vector<double> const& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}
// max |a − b| / max |b| (absolute when b is zero).
template <class T>
double relative_difference(std::vector<T> const& a, std::vector<T> const& b) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale == 0 ? diff : diff / scale;
}

// Every rank's own layers, and the tied weight on both holders, against the reference.
template <class T>
std::vector<std::string> compare(std::vector<StageOutcome<T>> const& out, Params<T> const& ref,
                                 T ref_loss, double tol) {
  std::vector<std::string> bad;
  T loss = 0;
  for (std::size_t r = 0; r < out.size(); ++r) {
    auto const& o = out[r];
    loss += o.step.loss;
    if (!o.stash_empty) bad.push_back(fmt::format("rank {}: activations left in the stash", r));
    for (int l : o.layers) {
      double const dw = relative_difference(o.grads.w[l], ref.w[l]);
      double const db = relative_difference(o.grads.b[l], ref.b[l]);
      if (dw > tol || db > tol)
        bad.push_back(
            fmt::format("rank {} layer {}: relative difference W {:g} b {:g}", r, l, dw, db));
    }
    if (o.holds_tied) {
      double const de = relative_difference(o.grads.e, ref.e);
      if (de > tol) bad.push_back(fmt::format("rank {}: tied E relative difference {:g}", r, de));
    }
  }
  if (std::abs(double(loss) - double(ref_loss)) > tol * std::abs(double(ref_loss)))
    bad.push_back(fmt::format("loss {} but the single rank's is {}", loss, ref_loss));
  return bad;
}

// Runs `schedule` on a world of PP ranks (pp group = world), then sums the tied weight's
// gradient over the embedding group (first and last stage).
template <class T, PipelineSchedule S>
std::vector<StageOutcome<T>> run_mlp(S const& schedule, int per_chunk) {
  int const p = schedule.num_stages(), n = schedule.num_chunks();
  std::vector<StageOutcome<T>> out(static_cast<std::size_t>(p));
  inproc::run(
      p,
      [&](inproc::Communicator& world) {
        int const stage = world.rank();
        auto embedding = world.split(stage == 0 || stage == p - 1 ? 0 : kUndefinedColor, stage);
        MlpStage<T> model(Params<T>::initial(p * n * per_chunk), p, n, stage, per_chunk, 0);
        auto step = run_pipeline(schedule, world, model, {.logical_clock = true});
        all_reduce_tied(embedding, std::span<T>(model.grads().e));
        out[static_cast<std::size_t>(stage)] = {model.grads(), model.layers(), embedding.valid(),
                                                std::move(step), model.stash_empty()};
      },
      {.timeout = kTimeout});
  return out;
}

std::string describe(OneFOneB const& s) {
  return fmt::format("1F1B PP={} M={}", s.stages, s.microbatches);
}
std::string describe(Interleaved const& s) {
  return fmt::format("interleaved PP={} VPP={} M={} Gm={}", s.stages, s.virtual_stages,
                     s.microbatches, s.group_size());
}

template <class T, PipelineSchedule S>
void check_gradients(S const& schedule, double tol) {
  int const per_chunk = 2;
  int const layers = schedule.num_stages() * schedule.num_chunks() * per_chunk;
  auto const p = Params<T>::initial(layers);
  auto ref = Params<T>::zeros(layers);
  T const ref_loss = reference_step(p, ref, 0, schedule.num_microbatches());
  auto const out = run_mlp<T>(schedule, per_chunk);
  INFO(describe(schedule));
  auto const bad = compare(out, ref, ref_loss, tol);
  for (auto const& b : bad) UNSCOPED_INFO(b);
  CHECK(bad.empty());
  // The layers' gradients are not all trivially zero (tanh is not saturated).
  CHECK(max_abs(std::vector<double>(ref.e.begin(), ref.e.end())) > 1e-3);
}

// A stage that does nothing but pass one value along: for measuring the clock alone.
struct UnitStage {
  using value_type = float;
  std::size_t activation_size() const { return 1; }
  void forward(int, int, std::span<float const>, std::span<float> out) { out[0] = 1; }
  void backward(int, int, std::span<float const>, std::span<float> in_grad) {
    for (float& x : in_grad) x = 0;
  }
};
static_assert(PipelineStageModel<UnitStage>);

template <PipelineSchedule S>
std::vector<PipelineStepResult<float>> measure(S const& schedule) {
  std::vector<PipelineStepResult<float>> out(static_cast<std::size_t>(schedule.num_stages()));
  inproc::run(schedule.num_stages(),
              [&](inproc::Communicator& world) {
                UnitStage model;
                out[static_cast<std::size_t>(world.rank())] =
                    run_pipeline(schedule, world, model, {.logical_clock = true});
              },
              {.timeout = kTimeout});
  return out;
}

// Differences between the executor's logical timeline and the simulation's (eager sends).
template <PipelineSchedule S>
std::vector<std::string> against_simulation(S const& schedule,
                                            std::vector<PipelineStepResult<float>> const& got) {
  auto const sim = simulate(schedule, {}, SendMode::eager);
  std::vector<std::string> bad;
  for (std::size_t r = 0; r < got.size(); ++r) {
    auto const& mine = got[r].computations;
    auto const& theirs = sim.stages[r];
    if (mine.size() != theirs.size()) {
      bad.push_back(
          fmt::format("rank {}: {} computations, simulation {}", r, mine.size(), theirs.size()));
      continue;
    }
    for (std::size_t i = 0; i < mine.size(); ++i)
      if (!(mine[i].action == theirs[i].action) || mine[i].start != theirs[i].start ||
          mine[i].end != theirs[i].end)
        bad.push_back(fmt::format("rank {} {}: [{}, {}) but simulated {} [{}, {})", r,
                                  to_string(mine[i].action, true), mine[i].start, mine[i].end,
                                  to_string(theirs[i].action, true), theirs[i].start,
                                  theirs[i].end));
    if (got[r].busy != sim.busy[r] || got[r].makespan != sim.makespan ||
        got[r].total_idle != sim.total_idle())
      bad.push_back(fmt::format("rank {}: busy {} makespan {} idle {}, simulated {} {} {}", r,
                                got[r].busy, got[r].makespan, got[r].total_idle, sim.busy[r],
                                sim.makespan, sim.total_idle()));
  }
  return bad;
}

}  // namespace

TEST_CASE("the reference's gradients match finite differences of its loss",
          "[pipeline][executor]") {
  int const layers = 4, count = 3;
  auto p = Params<double>::initial(layers);
  auto g = Params<double>::zeros(layers);
  reference_step(p, g, 0, count);
  auto loss = [&] {
    auto scratch = Params<double>::zeros(layers);
    return reference_step(p, scratch, 0, count);
  };
  auto fd = [&](double& x) { return moefold::test::central_difference(x, loss); };
  CHECK(fd(p.w[1][5]) == Approx(g.w[1][5]).epsilon(1e-6));
  CHECK(fd(p.w[3][0]) == Approx(g.w[3][0]).epsilon(1e-6));
  CHECK(fd(p.b[2][1]) == Approx(g.b[2][1]).epsilon(1e-6));
  CHECK(fd(p.e[4]) == Approx(g.e[4]).epsilon(1e-6));  // both uses of the tied weight
  CHECK(fd(p.e[10]) == Approx(g.e[10]).epsilon(1e-6));
}

TEST_CASE("1F1B over PP ranks computes the single rank's gradients", "[pipeline][executor]") {
  for (int pp : {2, 4})
    for (int m : {1, 4, 8})
      check_gradients<double>(OneFOneB{.stages = pp, .microbatches = m}, 1e-12);
}

TEST_CASE("interleaved 1F1B over PP ranks computes the single rank's gradients",
          "[pipeline][executor]") {
  for (int pp : {2, 4})
    for (int m : {4, 8})
      check_gradients<double>(Interleaved{.stages = pp, .virtual_stages = 2, .microbatches = m},
                              1e-12);
  check_gradients<double>(
      Interleaved{.stages = 2, .virtual_stages = 3, .microbatches = 5, .microbatch_group_size = 3},
      1e-12);
}

TEST_CASE("the executor runs float models too", "[pipeline][executor]") {
  check_gradients<float>(OneFOneB{.stages = 4, .microbatches = 8}, 1e-5);
  check_gradients<float>(Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 8}, 1e-5);
}

TEST_CASE(
    "with data parallelism: the pp and embedding groups of ProcessGroups give the "
    "single rank's gradients of all replicas' microbatches",
    "[pipeline][executor]") {
  // W = 8, PP = 2, DP = 4 (order tp-cp-ep-dp-pp: the two stages of a pipeline are ranks r and
  // r + 4). Replica d runs microbatches d·M … d·M + M − 1.
  int const pp = 2, dp = 4, m = 4, per_chunk = 2;
  auto const fold = FoldedMapping::from({.world = pp * dp, .pp = pp});
  for (int vpp : {1, 2}) {
    INFO("VPP " << vpp);
    int const layers = pp * vpp * per_chunk;
    std::vector<StageOutcome<double>> out(static_cast<std::size_t>(pp * dp));
    inproc::run(
        pp * dp,
        [&](inproc::Communicator& world) {
          ProcessGroups groups(fold, world);
          int const stage = groups.pp().rank(), replica = groups.dp().rank();
          MlpStage<double> model(Params<double>::initial(layers), pp, vpp, stage, per_chunk,
                                 replica * m);
          PipelineStepResult<double> step;
          if (vpp == 1)
            step = run_pipeline(OneFOneB{.stages = pp, .microbatches = m}, groups.pp(), model);
          else
            step = run_pipeline(Interleaved{.stages = pp, .virtual_stages = vpp, .microbatches = m},
                                groups.pp(), model);
          auto& g = model.grads();
          for (int l : model.layers()) {  // the DP gradient sum, then the tied weight's
            groups.dp().all_reduce(std::span<double>(g.w[l]));
            groups.dp().all_reduce(std::span<double>(g.b[l]));
          }
          bool const tied = groups.embedding().valid();
          if (tied) groups.dp().all_reduce(std::span<double>(g.e));
          all_reduce_tied(groups.embedding(), std::span<double>(g.e));
          out[static_cast<std::size_t>(world.rank())] = {g, model.layers(), tied, step,
                                                         model.stash_empty()};
        },
        {.timeout = kTimeout});
    auto const p = Params<double>::initial(layers);
    auto ref = Params<double>::zeros(layers);
    double const ref_loss = reference_step(p, ref, 0, dp * m);
    auto const bad = compare(out, ref, ref_loss, 1e-12);
    for (auto const& b : bad) UNSCOPED_INFO(b);
    CHECK(bad.empty());
    int holders = 0;
    for (auto const& o : out) holders += o.holds_tied ? 1 : 0;
    CHECK(holders == pp * dp);  // with PP = 2 every rank is a first or a last stage
  }
}

TEST_CASE("1F1B: the executor's logical clock measures the bubble (p−1)/(m+p−1)",
          "[pipeline][executor][bubble]") {
  for (int pp : {1, 2, 3, 4, 8})
    for (int m : {1, 2, 5, 8, 16}) {
      OneFOneB const s{.stages = pp, .microbatches = m};
      INFO(describe(s));
      auto const got = measure(s);
      for (std::size_t r = 0; r < got.size(); ++r) {
        INFO("rank " << r);
        CHECK(got[r].busy == 3 * m);
        CHECK(got[r].makespan == 3 * (m + pp - 1));
        // idle / (p · makespan) = (p − 1)/(m + p − 1), compared exactly in integers
        CHECK(static_cast<long>(got[r].total_idle) * (m + pp - 1) ==
              static_cast<long>(pp - 1) * pp * got[r].makespan);
        CHECK(got[r].idle_fraction() == Approx(s.ideal_bubble_fraction()).epsilon(1e-15));
      }
      auto const bad = against_simulation(s, got);
      for (auto const& b : bad) UNSCOPED_INFO(b);
      CHECK(bad.empty());
    }
}

TEST_CASE("interleaved: the executor's logical clock gives the simulation's timeline and bubble",
          "[pipeline][executor][bubble]") {
  std::vector<Interleaved> const configs{
      {.stages = 2, .virtual_stages = 2, .microbatches = 4},
      {.stages = 2, .virtual_stages = 2, .microbatches = 5, .microbatch_group_size = 3},
      {.stages = 3, .virtual_stages = 2, .microbatches = 6},
      {.stages = 4, .virtual_stages = 2, .microbatches = 8},
      {.stages = 4, .virtual_stages = 3, .microbatches = 12, .microbatch_group_size = 6},
      {.stages = 4, .virtual_stages = 2, .microbatches = 9, .microbatch_group_size = 5},
      {.stages = 8, .virtual_stages = 2, .microbatches = 16},
  };
  for (auto const& s : configs) {
    INFO(describe(s));
    auto const got = measure(s);
    auto const sim = simulate(s);
    for (auto const& r : got) {
      CHECK(r.idle_fraction() == Approx(sim.idle_fraction()).epsilon(1e-15));
      // The simulation meets the ideal per-chunk bubble for every valid schedule (pipeline.md).
      CHECK(r.idle_fraction() == Approx(s.ideal_bubble_fraction()).epsilon(1e-15));
    }
    auto const bad = against_simulation(s, got);
    for (auto const& b : bad) UNSCOPED_INFO(b);
    CHECK(bad.empty());
  }
}

namespace {

// Throws in the forward or backward of one (stage, microbatch).
struct FailingStage {
  using value_type = float;
  int stage = 0;
  int fail_stage = 1;
  int fail_microbatch = 2;
  bool in_backward = false;

  std::size_t activation_size() const { return 1; }
  void fail_if(bool backward, int mb) const {
    if (stage == fail_stage && mb == fail_microbatch && backward == in_backward)
      throw std::runtime_error(fmt::format("stage {} cannot run {} of microbatch {}", stage,
                                           backward ? "backward" : "forward", mb));
  }
  void forward(int mb, int chunk, std::span<float const> in, std::span<float> out) {
    fail_if(false, mb);
    UnitStage{}.forward(mb, chunk, in, out);
  }
  void backward(int mb, int chunk, std::span<float const> g, std::span<float> in_grad) {
    fail_if(true, mb);
    UnitStage{}.backward(mb, chunk, g, in_grad);
  }
};

// How a failing pipeline step ended: the error `inproc::run` rethrew, and on each rank how it
// ended ("finished", "threw" for the model's own exception, or the category of a
// `moefold::error`) and with which message.
struct FailedStep {
  std::string what = "nothing thrown";
  std::vector<std::string> ending;
  std::vector<std::string> messages;
};

template <PipelineSchedule S>
FailedStep run_failing(S const& s, FailingStage proto) {
  auto const n = static_cast<std::size_t>(s.num_stages());
  FailedStep out{.ending = std::vector<std::string>(n, "finished"),
                 .messages = std::vector<std::string>(n)};
  try {
    inproc::run(s.num_stages(),
                [&](inproc::Communicator& world) {
                  auto const me = static_cast<std::size_t>(world.rank());
                  FailingStage model = proto;
                  model.stage = world.rank();
                  try {
                    run_pipeline(s, world, model);
                  } catch (error const& e) {
                    out.ending[me] = std::string(to_string(e.category()));
                    out.messages[me] = e.what();
                    throw;
                  } catch (std::exception const& e) {
                    out.ending[me] = "threw";
                    out.messages[me] = e.what();
                    throw;
                  }
                },
                {.timeout = kTimeout});
  } catch (std::exception const& e) {
    out.what = e.what();
  }
  return out;
}

}  // namespace

TEST_CASE("a stage that throws makes every stage fail fast, each naming the failing rank",
          "[pipeline][executor][fault]") {
  SECTION("1F1B, a forward on stage 1") {
    auto const r = run_failing(OneFOneB{.stages = 4, .microbatches = 8}, {.fail_stage = 1});
    CHECK(r.what == "stage 1 cannot run forward of microbatch 2");
    CHECK(r.ending == std::vector<std::string>{"aborted", "threw", "aborted", "aborted"});
    for (std::size_t stage : {0u, 2u, 3u}) {
      INFO("stage " << stage << ": " << r.messages[stage]);
      CHECK_THAT(r.messages[stage],
                 Catch::Matchers::Contains(
                     "because rank 1 failed: stage 1 cannot run forward of microbatch 2"));
    }
  }
  SECTION("1F1B, a backward on stage 2") {
    auto const r = run_failing(OneFOneB{.stages = 4, .microbatches = 8},
                               {.fail_stage = 2, .fail_microbatch = 1, .in_backward = true});
    CHECK(r.what == "stage 2 cannot run backward of microbatch 1");
    CHECK(r.ending == std::vector<std::string>{"aborted", "aborted", "threw", "aborted"});
    for (std::size_t stage : {0u, 1u, 3u}) {
      INFO("stage " << stage << ": " << r.messages[stage]);
      CHECK_THAT(r.messages[stage],
                 Catch::Matchers::Contains(
                     "because rank 2 failed: stage 2 cannot run backward of microbatch 1"));
    }
  }
  SECTION("interleaved, a backward on the last stage") {
    auto const r = run_failing(Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 8},
                               {.fail_stage = 3, .fail_microbatch = 0, .in_backward = true});
    CHECK(r.what == "stage 3 cannot run backward of microbatch 0");
    CHECK(r.ending == std::vector<std::string>{"aborted", "aborted", "aborted", "threw"});
    for (std::size_t stage : {0u, 1u, 2u}) {
      INFO("stage " << stage << ": " << r.messages[stage]);
      CHECK_THAT(r.messages[stage], Catch::Matchers::Contains("because rank 3 failed: stage 3"));
    }
  }
  SECTION("interleaved, a forward on the first stage") {
    auto const r = run_failing(Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 8},
                               {.fail_stage = 0, .fail_microbatch = 3});
    CHECK(r.what == "stage 0 cannot run forward of microbatch 3");
    CHECK(r.ending == std::vector<std::string>{"threw", "aborted", "aborted", "aborted"});
    for (std::size_t stage : {1u, 2u, 3u}) {
      INFO("stage " << stage << ": " << r.messages[stage]);
      CHECK_THAT(r.messages[stage], Catch::Matchers::Contains("because rank 0 failed: stage 0"));
    }
  }
}

TEST_CASE("a stage that returns before its step fails its neighbours at once, naming it",
          "[pipeline][executor][fault]") {
  // Stage 2 stops as a crashed stage would. The timeout is far away: the neighbours learn at
  // once that stage 2 will never send.
  std::vector<std::string> messages(4);
  std::string what = "nothing thrown";
  try {
    inproc::run(4,
                [&](inproc::Communicator& world) {
                  if (world.rank() == 2) return;
                  UnitStage model;
                  try {
                    run_pipeline(OneFOneB{.stages = 4, .microbatches = 4}, world, model);
                  } catch (error const& e) {
                    messages[static_cast<std::size_t>(world.rank())] = e.what();
                    throw;
                  }
                },
                {.timeout = std::chrono::minutes(10)});
  } catch (error const& e) {
    what = e.what();
  }
  CHECK_THAT(what, Catch::Matchers::Contains("world rank 2 has returned from its rank function"));
  for (std::size_t r : {0u, 1u, 3u}) {
    INFO("rank " << r);
    CHECK_THAT(messages[r], Catch::Matchers::Contains("rank 2"));
  }
}

TEST_CASE("run_pipeline rejects a pp group that does not match the schedule",
          "[pipeline][executor]") {
  std::string what;
  try {
    inproc::run(2,
                [](inproc::Communicator& world) {
                  UnitStage model;
                  run_pipeline(OneFOneB{.stages = 4, .microbatches = 4}, world, model);
                },
                {.timeout = kTimeout});
  } catch (invalid_config const& e) {
    what = e.what();
  }
  CHECK(what == "the pp group has 2 ranks but the schedule has PP = 4 stages");
}
