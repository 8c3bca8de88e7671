// The distributed optimizer against the all-reduce path: on synthetic gradients whose replicas
// differ in a known way (as gradient_reduction_test), two clipped AdamW steps with the state
// sharded over dp_cp / edp (and the partial groups of N = 2 instances) give the parameters and
// the gradient norm of the unsharded AdamW steps, under 6 foldings (EDP ≠ DP·CP among them);
// optimizer state per rank is the unsharded state / shard count, counted from the buffers; a
// sharded checkpoint reloads under another folding into either optimizer and the next step is
// the reference's.

#include <cmath>
#include <filesystem>
#include <mutex>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/train/checkpoint.hpp"
#include "moefold/train/distributed_optimizer.hpp"
#include "moefold/train/training_state.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;
namespace fs = std::filesystem;
using Comm = inproc::Communicator;
using DistOpt = DistributedOptimizer<test::Exec, float, Comm>;
using Moment = DistOpt::Moments::value_type;  // the same type as AdamW's (checked below)
static_assert(std::is_same_v<Moment, AdamW<test::Exec, float>::Moments::value_type>);

namespace {

/// Column counts of the four parameters; the global shapes do not depend on the folding.
struct Shapes {
  std::int64_t dense = 37, norm = 19, expert = 11, bias = 48;
};
Shapes const kAligned{.dense = 512, .norm = 512, .expert = 512, .bias = 2048};

/// One rank's parameters: dense [8, dense] by row blocks over (pp, tp); TP-replicated [2, norm]
/// by row over pp; expert [8, expert] by rows over (pp, ep, etp); a 1-row dense bias split by
/// columns over (pp, tp) (no weight decay).
struct Model {
  Param<float> dense, norm, expert, bias;
  Model(FoldedMapping const& f, int rank, Shapes s) {
    auto const a = f.attention_coord(rank);
    auto const m = f.moe_coord(rank);
    std::int64_t const mp = f.pp() * f.tp(), me = f.pp() * f.ep() * f.etp();
    std::int64_t const at = a[Axis::pp] * f.tp() + a[Axis::tp];
    std::int64_t const et = (a[Axis::pp] * f.ep() + m[Axis::ep]) * f.etp() + m[Axis::etp];
    dense = Param<float>("dense", ParamClass::dense, 8, s.dense,
                         {{.row0 = at * 8 / mp, .rows = 8 / mp, .col0 = 0, .cols = s.dense}});
    norm = Param<float>("norm", ParamClass::tp_replicated, 2, s.norm,
                        {{.row0 = a[Axis::pp] * 2 / f.pp(), .rows = 2 / f.pp(), .col0 = 0,
                          .cols = s.norm}});
    expert = Param<float>("expert", ParamClass::expert, 8, s.expert,
                          {{.row0 = et * 8 / me, .rows = 8 / me, .col0 = 0, .cols = s.expert}});
    bias = Param<float>("bias", ParamClass::dense, 1, s.bias,
                        {{.row0 = 0, .rows = 1, .col0 = at * s.bias / mp, .cols = s.bias / mp}});
    std::uint64_t seed = 11;
    for (auto* p : list()) p->init(seed++, InitDist::normal, 0.5);
  }
  ParamList<float> list() { return {&dense, &norm, &expert, &bias}; }
};

double base(std::int64_t idx, int step) {
  return 0.25 * static_cast<double>((idx + 3 * step) % 7) - 0.5;
}

/// Gradients of `step`: a function of the global index, plus the replica's offset (dp_cp rank,
/// and 10·tp for TP-replicated parameters; edp rank for experts).
void fill_grads(Model& m, ProcessGroups<Comm>& g, int step) {
  auto const q = static_cast<double>(g.dp_cp().rank()), e = static_cast<double>(g.edp().rank());
  auto const tp = static_cast<double>(g.tp().rank());
  for (auto* p : m.list()) {
    double const off = p->cls == ParamClass::expert ? e
                       : p->cls == ParamClass::tp_replicated ? q + 10.0 * tp
                                                             : q;
    std::size_t i = 0;
    for (auto const& b : p->blocks)
      for (std::int64_t r = 0; r < b.rows; ++r)
        for (std::int64_t c = 0; c < b.cols; ++c, ++i)
          p->grad[i] = static_cast<float>(base((b.row0 + r) * p->global_cols + b.col0 + c, step) +
                                          off);
  }
}

/// ‖a − b‖ / ‖b‖.
double rel_diff(Param<float> const& a, Param<float> const& b) {
  double d = 0, n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d += (double(a.value[i]) - b.value[i]) * (double(a.value[i]) - b.value[i]);
    n += double(b.value[i]) * b.value[i];
  }
  return std::sqrt(d / std::max(n, 1e-300));
}

constexpr double kMaxNorm = 1.0;  // the norms are ≫ 1: clipping is on

struct RankResult {
  double worst = 0;  // worst relative difference of a parameter
  double norm_ref = 0, norm_dist = 0;
  std::int64_t state_dense = 0, state_expert = 0, unsharded_dense = 0, unsharded_expert = 0;
  std::int64_t shards_dense = 1, shards_expert = 1;
  std::string failure;
};

std::vector<RankResult> compare_steps(FoldingConfig const& cfg, Shapes shapes,
                                      std::optional<std::int64_t> bucket_size = std::nullopt) {
  auto const fold = FoldedMapping::from(cfg);
  std::vector<RankResult> out(static_cast<std::size_t>(fold.world_size()));
  inproc::run(fold.world_size(), [&](Comm& world) {
    auto& r = out[static_cast<std::size_t>(world.rank())];
    try {
      ProcessGroups groups(fold, world);
      Model ref(fold, world.rank(), shapes), dist(fold, world.rank(), shapes);
      AdamW<test::Exec, float> adam(ref.list(), {.weight_decay = 0.1});
      DistOpt dopt(test::Exec{}, dist.list(), groups, {.weight_decay = 0.1},
                   {.bucket_size = bucket_size});
      for (int step = 1; step <= 2; ++step) {
        fill_grads(ref, groups, step);
        fill_grads(dist, groups, step);
        reduce_gradients(test::Exec{}, ref.list(), groups);
        r.norm_ref = clip_grad_norm(test::Exec{}, ref.list(), groups, kMaxNorm);
        adam.step(1e-2);
        dopt.reduce_gradients();
        r.norm_dist = dopt.clip_grad_norm(kMaxNorm);
        dopt.step(1e-2);
      }
      auto const a = ref.list(), b = dist.list();
      for (std::size_t k = 0; k < a.size(); ++k) r.worst = std::max(r.worst, rel_diff(*b[k], *a[k]));
      for (std::size_t k = 0; k < a.size(); ++k) {
        auto const bytes = static_cast<std::int64_t>(
            (adam.exp_avg(k).size() + adam.exp_avg_sq(k).size()) * sizeof(Moment));
        (a[k]->cls == ParamClass::expert ? r.unsharded_expert : r.unsharded_dense) += bytes;
      }
      for (auto const& bk : dopt.buckets())
        (bk.expert ? r.state_expert : r.state_dense) +=
            static_cast<std::int64_t>((bk.exp_avg.size() + bk.exp_avg_sq.size()) * sizeof(Moment));
      int const n = fold.num_distributed_optimizer_instances();
      r.shards_dense = fold.dp() * fold.cp() / n;
      r.shards_expert = fold.edp() / n;
    } catch (std::exception const& e) {
      r.failure = e.what();
      throw;
    }
  });
  return out;
}

std::vector<FoldingConfig> const kFoldings{
    {.world = 1},
    {.world = 4, .tp = 2, .ep = 2, .etp = 1},                        // DP 2, EDP 2
    {.world = 8, .tp = 2, .cp = 2, .ep = 4, .etp = 1},               // DP·CP 4, EDP 2
    {.world = 8, .tp = 2, .ep = 2, .etp = 2},                        // DP 4, EDP 2, ETP 2
    {.world = 8, .tp = 1, .cp = 2, .pp = 2, .ep = 2, .etp = 1},      // PP 2, DP·CP 4, EDP 2
    {.world = 8, .tp = 2, .ep = 2, .etp = 1, .num_distributed_optimizer_instances = 2},
};

std::string describe(FoldingConfig const& c) {
  return fmt::format("world {} tp {} cp {} pp {} ep {} etp {} instances {}", c.world, c.tp, c.cp,
                     c.pp, c.ep, c.etp.value_or(c.tp), c.num_distributed_optimizer_instances);
}

}  // namespace

TEST_CASE("a step with the distributed optimizer equals the step without it") {
  for (auto const& cfg : kFoldings) {
    for (auto bucket : {std::optional<std::int64_t>{}, std::optional<std::int64_t>{100}}) {
      INFO(describe(cfg) << (bucket ? " buckets of 100" : " one bucket"));
      for (auto const& r : compare_steps(cfg, Shapes{}, bucket)) {
        REQUIRE(r.failure.empty());
        CHECK(r.worst <= 1e-5);
        CHECK(std::abs(r.norm_dist - r.norm_ref) <= 1e-6 * r.norm_ref);
        CHECK(r.norm_ref > 10 * kMaxNorm);  // clipping was on
      }
    }
  }
}

TEST_CASE("optimizer state per rank is the unsharded state divided by the shard count") {
  for (auto const& cfg : kFoldings) {
    INFO(describe(cfg));
    for (auto const& r : compare_steps(cfg, kAligned)) {
      REQUIRE(r.failure.empty());
      CHECK(r.worst <= 1e-5);
      CHECK(r.state_dense * r.shards_dense == r.unsharded_dense);
      CHECK(r.state_expert * r.shards_expert == r.unsharded_expert);
      CHECK(r.unsharded_expert > 0);
    }
  }
}

TEST_CASE("blocks_of_range cuts rows into 1-row blocks and keeps whole rows whole") {
  // Local storage: rows 2..4 of cols [3, 7) (12 elements), then row 0 of cols [0, 5).
  std::vector<ParamBlock> const blocks{{.row0 = 2, .rows = 3, .col0 = 3, .cols = 4},
                                       {.row0 = 0, .rows = 1, .col0 = 0, .cols = 5}};
  auto const got = blocks_of_range(blocks, 2, 13);  // local [2, 15)
  std::vector<ParamBlock> const want{{.row0 = 2, .rows = 1, .col0 = 5, .cols = 2},
                                     {.row0 = 3, .rows = 2, .col0 = 3, .cols = 4},
                                     {.row0 = 0, .rows = 1, .col0 = 0, .cols = 3}};
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CHECK(got[i].row0 == want[i].row0);
    CHECK(got[i].rows == want[i].rows);
    CHECK(got[i].col0 == want[i].col0);
    CHECK(got[i].cols == want[i].cols);
  }
  auto const inner = blocks_of_range(blocks, 5, 2);  // local [5, 7): inside row 3
  REQUIRE(inner.size() == 1);
  CHECK((inner[0].row0 == 3 && inner[0].rows == 1 && inner[0].col0 == 4 && inner[0].cols == 2));
}

namespace {

/// Runs two steps under `from` (the distributed optimizer when `dist_from`) and saves; reloads
/// under `to` into the distributed optimizer or AdamW and runs step 3; returns the parameters'
/// global values after step 3, on rank 0, as (name → values of its blocks) per rank joined.
struct Reloaded {
  std::vector<std::vector<float>> values;  // per rank, the four parameters concatenated
  std::int64_t steps = 0;
  std::string failure;
};

void save_after_two_steps(fs::path const& dir, FoldingConfig const& from, bool dist) {
  auto const fold = FoldedMapping::from(from);
  std::mutex mu;
  std::string failure;
  inproc::run(fold.world_size(), [&](Comm& world) {
    try {
      ProcessGroups groups(fold, world);
      Model m(fold, world.rank(), Shapes{});
      auto writes = [&](Param<float> const& p) {
        if (p.cls == ParamClass::expert) return groups.edp().rank() == 0;
        return groups.dp_cp().rank() == 0 &&
               (p.cls != ParamClass::tp_replicated || groups.tp().rank() == 0);
      };
      CheckpointInfo info;
      info.folding.set("world_size", fold.world_size());
      if (dist) {
        DistOpt opt(test::Exec{}, m.list(), groups, {.weight_decay = 0.1});
        for (int step = 1; step <= 2; ++step) {
          fill_grads(m, groups, step);
          opt.reduce_gradients();
          opt.clip_grad_norm(kMaxNorm);
          opt.step(1e-2);
        }
        save_checkpoint(test::Exec{}, world, dir, 2,
                        training_state_entries(opt, writes, world.rank() == 0), info);
      } else {
        AdamW<test::Exec, float> opt(m.list(), {.weight_decay = 0.1});
        for (int step = 1; step <= 2; ++step) {
          fill_grads(m, groups, step);
          reduce_gradients(test::Exec{}, m.list(), groups);
          clip_grad_norm(test::Exec{}, m.list(), groups, kMaxNorm);
          opt.step(1e-2);
        }
        save_checkpoint(test::Exec{}, world, dir, 2,
                        training_state_entries(opt, writes, world.rank() == 0), info);
      }
    } catch (std::exception const& e) {
      std::lock_guard lock(mu);
      failure = e.what();
      throw;
    }
  });
  REQUIRE(failure.empty());
}

Reloaded step_three(fs::path const& dir, FoldingConfig const& to, bool dist) {
  auto const fold = FoldedMapping::from(to);
  Reloaded out;
  out.values.resize(static_cast<std::size_t>(fold.world_size()));
  std::mutex mu;
  inproc::run(fold.world_size(), [&](Comm& world) {
    try {
      ProcessGroups groups(fold, world);
      Model m(fold, world.rank(), Shapes{});
      auto const ckpt = CheckpointReader::open(dir);
      fill_grads(m, groups, 3);
      std::int64_t steps = 0;
      if (dist) {
        DistOpt opt(test::Exec{}, m.list(), groups, {.weight_decay = 0.1});
        restore_training_state(ckpt, opt);
        steps = opt.steps();
        opt.reduce_gradients();
        opt.clip_grad_norm(kMaxNorm);
        opt.step(1e-2);
      } else {
        AdamW<test::Exec, float> opt(m.list(), {.weight_decay = 0.1});
        restore_training_state(ckpt, opt);
        steps = opt.steps();
        reduce_gradients(test::Exec{}, m.list(), groups);
        clip_grad_norm(test::Exec{}, m.list(), groups, kMaxNorm);
        opt.step(1e-2);
      }
      auto& v = out.values[static_cast<std::size_t>(world.rank())];
      for (auto* p : m.list()) v.insert(v.end(), p->value.begin(), p->value.end());
      if (world.rank() == 0) out.steps = steps;
    } catch (std::exception const& e) {
      std::lock_guard lock(mu);
      out.failure = e.what();
      throw;
    }
  });
  return out;
}

double rel_diff(std::vector<float> const& a, std::vector<float> const& b) {
  double d = 0, n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    n += double(b[i]) * b[i];
  }
  return std::sqrt(d / std::max(n, 1e-300));
}

}  // namespace

TEST_CASE("a sharded checkpoint reloads under another folding, with or without sharding") {
  auto const root =
      fs::temp_directory_path() / ("moefold_distopt_test_" + std::to_string(::getpid()));
  fs::remove_all(root);
  FoldingConfig const from{.world = 8, .tp = 2, .ep = 2, .etp = 1,
                           .num_distributed_optimizer_instances = 2};  // DP 4, EDP 4, N 2
  save_after_two_steps(root / "dist", from, true);
  save_after_two_steps(root / "plain", from, false);
  struct Case {
    FoldingConfig to;
    bool dist;
  };
  for (auto const& c : {Case{{.world = 1}, false}, Case{{.world = 1}, true},
                        Case{{.world = 4, .tp = 2, .ep = 2, .etp = 1}, true},
                        Case{{.world = 8, .tp = 1, .cp = 2, .pp = 2, .ep = 2, .etp = 1}, true},
                        Case{{.world = 8, .tp = 2, .cp = 2, .ep = 4, .etp = 1}, false}}) {
    INFO("reloaded under " << describe(c.to) << (c.dist ? " distributed" : " plain AdamW"));
    auto const want = step_three(root / "plain", c.to, false);
    auto const got = step_three(root / "dist", c.to, c.dist);
    REQUIRE(want.failure.empty());
    REQUIRE(got.failure.empty());
    CHECK(got.steps == 2);
    for (std::size_t r = 0; r < got.values.size(); ++r)
      CHECK(rel_diff(got.values[r], want.values[r]) <= 1e-5);
  }
  fs::remove_all(root);
}
