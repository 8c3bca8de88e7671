// The optimizers of a bf16 model (Megatron's --bf16): FP32 main parameters stepped by AdamW with
// the FP32 main gradients and written back rounded to bf16. Given the same FP32 gradients, the
// main parameters of AdamW<bf16> are bitwise the parameters of AdamW<float> started from the
// same (bf16-representable) values, and the bf16 values are those rounded — also under the
// distributed optimizer, where the main parameters are sharded like the moments. Updates far
// below bf16's resolution accumulate in the main parameters (a model stepped in bf16 would
// never move). Optimizer bytes count the main parameters. Checkpoints: a bf16 run saved with
// the distributed optimizer resumes in bf16 and in FP32 on one rank, and an FP32 checkpoint
// resumes in bf16, each continuing exactly as the FP32 twin run.

#include <cstdint>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/train/adamw.hpp"
#include "moefold/train/distributed_optimizer.hpp"
#include "moefold/train/gradient_reduction.hpp"
#include "moefold/train/training_state.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;
using Comm = inproc::Communicator;

namespace {

/// One rank's parameters under `fold` (TP = PP = 1): a dense [8, 37] and a 1-row bias [1, 19]
/// held whole, and the rank's EP share of an expert [8, 11].
template <class T>
struct Model {
  Param<T> dense, bias, expert;
  Model(FoldedMapping const& f, int rank) {
    auto const ep = f.moe_coord(rank)[Axis::ep];
    dense = Param<T>::whole("dense", ParamClass::dense, 8, 37);
    bias = Param<T>::whole("bias", ParamClass::dense, 1, 19);
    expert = Param<T>("expert", ParamClass::expert, 8, 11,
                      {{.row0 = ep * 8 / f.ep(), .rows = 8 / f.ep(), .col0 = 0, .cols = 11}});
    std::uint64_t seed = 5;
    for (auto* p : list()) p->init(seed++, InitDist::normal, 0.5);
  }
  ParamList<T> list() { return {&dense, &bias, &expert}; }
};

/// The same FP32 gradients for both models: a function of (step, parameter, index, replica).
template <class T>
void fill_grads(Model<T>& m, int rank, int step) {
  int k = 0;
  for (auto* p : m.list()) {
    for (std::size_t i = 0; i < p->size(); ++i)
      p->grad[static_cast<std::int64_t>(i)] =
          0.01f * static_cast<float>((static_cast<int>(i) * 7 + step * 3 + k + rank) % 11) - 0.05f;
    ++k;
  }
}

/// Every bf16 value is its float twin rounded; returns how many bf16 values moved from `start`.
int check_rounded(Model<bf16>& b, Model<float>& f, std::vector<std::vector<bf16>> const& start) {
  int moved = 0;
  auto const pb = b.list();
  auto const pf = f.list();
  for (std::size_t k = 0; k < pb.size(); ++k)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(pb[k]->size()); ++i) {
      REQUIRE(pb[k]->value[i] == bf16(pf[k]->value[i]));
      moved += pb[k]->value[i] == start[k][static_cast<std::size_t>(i)] ? 0 : 1;
    }
  return moved;
}

std::vector<std::vector<bf16>> values_of(Model<bf16>& m) {
  std::vector<std::vector<bf16>> out;
  for (auto* p : m.list()) out.emplace_back(p->value.begin(), p->value.end());
  return out;
}

/// The float twin of a bf16 model: the same parameters with the bf16 values.
void copy_values(Model<bf16>& b, Model<float>& f) {
  auto const pb = b.list();
  auto const pf = f.list();
  for (std::size_t k = 0; k < pb.size(); ++k)
    for (std::int64_t i = 0; i < static_cast<std::int64_t>(pb[k]->size()); ++i)
      pf[k]->value[i] = static_cast<float>(pb[k]->value[i]);
}

}  // namespace

TEST_CASE("AdamW of a bf16 model steps FP32 main parameters exactly as AdamW of a float model",
          "[train][optimizer][bf16]") {
  auto const fold = FoldedMapping::from({.world = 1});
  Model<bf16> b(fold, 0);
  Model<float> f(fold, 0);
  copy_values(b, f);
  auto const start = values_of(b);
  AdamW<test::Exec, bf16> ab(b.list(), {.weight_decay = 0.1});
  AdamW<test::Exec, float> af(f.list(), {.weight_decay = 0.1});
  std::int64_t n = 0;
  for (auto* p : f.list()) n += static_cast<std::int64_t>(p->size());
  CHECK(af.state_bytes() == 8 * n);   // two FP32 moments
  CHECK(ab.state_bytes() == 12 * n);  // and FP32 main parameters
  // lr 1e-5: each update is ~1e-5, far below bf16's spacing (2⁻⁸ near 0.5).
  for (int step = 1; step <= 200; ++step) {
    fill_grads(b, 0, step);
    fill_grads(f, 0, step);
    ab.step(step <= 100 ? 1e-5 : 1e-3);
    af.step(step <= 100 ? 1e-5 : 1e-3);
    auto const pb = b.list();
  auto const pf = f.list();
    for (std::size_t k = 0; k < pb.size(); ++k)
      for (std::int64_t i = 0; i < static_cast<std::int64_t>(pb[k]->size()); ++i)
        REQUIRE(ab.main_param(k)[i] == pf[k]->value[i]);
    auto const moved = check_rounded(b, f, start);
    if (step == 200) CHECK(moved > static_cast<int>(n) / 2);
  }
}

TEST_CASE("the distributed optimizer of a bf16 model shards FP32 main parameters",
          "[train][optimizer][bf16]") {
  // DP 4 (dense shards over dp_cp = 4), EP 2, EDP 2 (expert shards over edp = 2).
  auto const fold = FoldedMapping::from({.world = 4, .ep = 2, .etp = 1});
  std::vector<std::int64_t> bytes_b(4), bytes_f(4), elems(4);
  inproc::run(fold.world_size(), [&](Comm& world) {
    ProcessGroups groups(fold, world);
    int const rank = world.rank();
    Model<bf16> b(fold, rank);
    Model<float> f(fold, rank);
    copy_values(b, f);
    auto const start = values_of(b);
    DistributedOptimizer<test::Exec, bf16, Comm> ob(test::Exec{}, b.list(), groups);
    DistributedOptimizer<test::Exec, float, Comm> of(test::Exec{}, f.list(), groups);
    for (int step = 1; step <= 3; ++step) {
      fill_grads(b, rank, step);
      fill_grads(f, rank, step);
      ob.reduce_gradients();
      of.reduce_gradients();
      double const nb = ob.clip_grad_norm(0.05), nf = of.clip_grad_norm(0.05);
      REQUIRE(nb == nf);
      ob.step(1e-2);
      of.step(1e-2);
      check_rounded(b, f, start);
    }
    auto const r = static_cast<std::size_t>(rank);
    bytes_b[r] = ob.state_bytes();
    bytes_f[r] = of.state_bytes();
    for (auto const& bk : ob.buckets()) elems[r] += static_cast<std::int64_t>(bk.main.size());
  });
  for (std::size_t r = 0; r < 4; ++r) {
    CHECK(bytes_f[r] == 8 * elems[r]);   // the moments of this rank's shard
    CHECK(bytes_b[r] == 12 * elems[r]);  // and its FP32 main parameters
  }
  // The shards cover each parameter element once: 8·37 + 19 dense elements over dp_cp = 4,
  // and each EP rank's 4·11 expert elements over edp = 2.
  std::int64_t total = 0;
  for (auto e : elems) total += e;
  CHECK(total == 8 * 37 + 19 + 8 * 11);
}

namespace {
namespace fs = std::filesystem;

/// Two steps of `Model<T>` with the distributed optimizer on 4 ranks (DP 4, EP 2), saved to `dir`.
template <class T>
void save_two_steps(fs::path const& dir) {
  auto const fold = FoldedMapping::from({.world = 4, .ep = 2, .etp = 1});
  inproc::run(fold.world_size(), [&](Comm& world) {
    ProcessGroups groups(fold, world);
    Model<T> m(fold, world.rank());
    if constexpr (std::is_same_v<T, float>) {  // the float twin starts from the bf16 values
      Model<bf16> b(fold, world.rank());
      copy_values(b, m);
    }
    DistributedOptimizer<test::Exec, T, Comm> opt(test::Exec{}, m.list(), groups);
    for (int step = 1; step <= 2; ++step) {
      fill_grads(m, world.rank(), step);
      opt.reduce_gradients();
      opt.step(1e-2);
    }
    auto writes = [&](Param<T> const& p) {
      return p.cls == ParamClass::expert ? groups.edp().rank() == 0 : groups.dp_cp().rank() == 0;
    };
    save_checkpoint(test::Exec{}, world, dir, 2,
                    training_state_entries(opt, writes, world.rank() == 0), CheckpointInfo{});
  });
}

/// One rank's AdamW<T> restored from `dir`, then a third step.
template <class T>
struct Resumed {
  Model<T> m{FoldedMapping::from({.world = 1}), 0};
  AdamW<test::Exec, T> opt{m.list()};
  explicit Resumed(fs::path const& dir) {
    restore_training_state(CheckpointReader::open(dir), opt);
    REQUIRE(opt.steps() == 2);
  }
  void step(int n) {
    fill_grads(m, 0, n);
    opt.step(1e-2);
  }
};
}  // namespace

TEST_CASE("bf16 and FP32 checkpoints resume in either precision", "[train][checkpoint][bf16]") {
  auto const root = fs::temp_directory_path() / ("moefold_bf16_ckpt_" + std::to_string(::getpid()));
  fs::remove_all(root);
  save_two_steps<bf16>(root / "bf16");
  save_two_steps<float>(root / "fp32");
  Resumed<float> ref(root / "fp32");       // the FP32 twin
  Resumed<bf16> b_from_b(root / "bf16");   // bf16 → bf16
  Resumed<float> f_from_b(root / "bf16");  // bf16 → FP32: the FP32 main parameters
  Resumed<bf16> b_from_f(root / "fp32");   // FP32 → bf16: main parameters = the FP32 values
  for (int round = 0; round < 2; ++round) {  // as restored, then after one more step
    auto const pr = ref.m.list();
    auto const pbb = b_from_b.m.list();
    auto const pfb = f_from_b.m.list();
    auto const pbf = b_from_f.m.list();
    for (std::size_t k = 0; k < pr.size(); ++k)
      for (std::int64_t i = 0; i < static_cast<std::int64_t>(pr[k]->size()); ++i) {
        INFO("round " << round << " " << pr[k]->name << "[" << i << "]");
        float const want = pr[k]->value[i];
        REQUIRE(b_from_b.opt.main_param(k)[i] == want);
        REQUIRE(pbb[k]->value[i] == bf16(want));
        REQUIRE(pfb[k]->value[i] == want);
        REQUIRE(b_from_f.opt.main_param(k)[i] == want);
        REQUIRE(pbf[k]->value[i] == bf16(want));
      }
    ref.step(3 + round);
    b_from_b.step(3 + round);
    f_from_b.step(3 + round);
    b_from_f.step(3 + round);
  }
  fs::remove_all(root);
}
