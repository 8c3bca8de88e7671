#pragma once
// Shared pieces of the nn/ tests: the foldings, deterministic data, the tolerance of DESIGN §3,
// the test's own gradient reduction (dense over dp_cp, tp_replicated also over tp), and the
// equivalence check of a block against its single-rank run over the whole global batch.

#include <cmath>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "comm/backends.hpp"
#include "support/error_of.hpp"
#include "support/exec.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/core/init.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/nn/attention.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/dense_mlp.hpp"
#include "moefold/nn/row_parallel_linear.hpp"
#include "moefold/nn/sequence_shard.hpp"

namespace moefold::test {

using Comm = inproc::Communicator;
using Groups = ProcessGroups<Comm>;

struct Folding {
  int tp = 1, cp = 1, dp = 1;
  int ep = 1, etp = 0;  ///< the MoE side; etp 0: Megatron's default (= TP)
  int world() const { return tp * cp * dp; }
  std::string str() const {
    return fmt::format("TP{}·CP{}·DP{} / EP{}·ETP{}", tp, cp, dp, ep, etp ? etp : tp);
  }
};

/// TP ∈ {1,2,4} × CP ∈ {1,2,4} × DP ∈ {1,2}, up to 16 ranks (17 foldings).
inline std::vector<Folding> all_foldings() {
  std::vector<Folding> out;
  for (int dp : {1, 2})
    for (int cp : {1, 2, 4})
      for (int tp : {1, 2, 4})
        if (tp * cp * dp <= 16) out.push_back({tp, cp, dp});
  return out;
}

inline FoldedMapping mapping_of(Folding f) {
  return FoldedMapping::from({.world = f.world(), .tp = f.tp, .cp = f.cp, .pp = 1, .ep = f.ep,
                              .etp = f.etp ? std::optional<int>(f.etp) : std::nullopt});
}

/// Column-parallel H→F followed by row-parallel F→H: both linear layers and their SP
/// collectives, nothing else.
template <class T>
struct LinearPair {
  ColumnParallelLinear<Exec, T, Comm> column;
  RowParallelLinear<Exec, T, Comm> row;
  LinearPair(Groups& g, std::uint64_t seed)
      : column({.name = "fc1.weight", .in = 32, .out = 48, .seed = seed, .scale = 0.3}, g.tp()),
        row({.name = "fc2.weight", .in = 48, .out = 32, .seed = seed, .scale = 0.3}, g.tp()) {}
  std::vector<T> forward(std::span<T const> x) {
    auto const h = column.forward(x);
    return row.forward(std::span<T const>(h));
  }
  std::vector<T> backward(std::span<T const> dy) {
    auto const dh = row.backward(dy);
    return column.backward(std::span<T const>(dh));
  }
  ParamList<T> parameters() { return {&column.weight(), &row.weight()}; }
};

/// The attention of the block tests. GQA: 8 query heads in 4 groups, head dim 8 (Q width
/// 64 ≠ H = 32), splits over TP = 4.
inline AttentionConfig attention_config(std::uint64_t seed = 1234) {
  return {.name = "layers.0.self_attention",
          .hidden = 32,
          .heads = 8,
          .kv_groups = 4,
          .head_dim = 8,
          .seed = seed,
          .init_scale = 0.3};
}

/// The dense SwiGLU MLP of the block tests.
inline DenseMlpConfig mlp_config(std::uint64_t seed = 1234) {
  return {.name = "layers.0.mlp", .hidden = 32, .ffn = 64, .seed = seed, .init_scale = 0.3};
}

/// A deterministic tensor: uniform in [-scale, scale), a function of (name, index).
template <class T>
std::vector<T> random_tensor(std::size_t n, std::string_view name, double scale = 1.0) {
  std::vector<T> v(n);
  init_block(std::span<T>(v), 7, name, static_cast<std::int64_t>(n), 0, 1, 0,
             static_cast<std::int64_t>(n), InitDist::uniform, scale);
  return v;
}

/// ‖a − b‖₂ / ‖b‖₂ (‖a − b‖₂ when b is zero).
template <class A, class B>
double rel_error(A const& a, B const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    double const d = double(widen(a[i])) - double(widen(b[i]));
    num += d * d;
    den += double(widen(b[i])) * double(widen(b[i]));
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// Records a failure unless ‖a − b‖₂ ≤ tol·‖b‖₂ (DESIGN §3: 1e-5 in fp32).
template <class A, class B>
void expect_close(RankChecks& checks, A const& a, B const& b, std::string const& what,
                  double tol = 1e-5) {
  if (a.size() != b.size()) {
    checks.check(false, fmt::format("{}: {} elements, expected {}", what, a.size(), b.size()));
    return;
  }
  double const e = rel_error(a, b);
  checks.check(e <= tol, fmt::format("{}: relative error {:.3e} > {:.1e}", what, e, tol));
}

/// The test's gradient reduction with sums (the gradient of the global batch's summed loss,
/// which the single-rank reference computes): dense SUM over dp_cp, tp_replicated also over tp,
/// expert SUM over edp (train/'s reduce_gradients is the same up to its 1/(DP·CP) factor).
template <class T>
void reduce_gradients(ParamList<T> const& params, Groups& groups) {
  for (auto* p : params) {
    if (p->cls == ParamClass::expert) {
      groups.edp().all_reduce(std::span<grad_t<T>>(p->grad));
      continue;
    }
    groups.dp_cp().all_reduce(std::span<grad_t<T>>(p->grad));
    if (p->cls == ParamClass::tp_replicated) groups.tp().all_reduce(std::span<grad_t<T>>(p->grad));
  }
}

/// What a single-rank run of a block gives for the whole global batch.
template <class T>
struct Reference {
  std::vector<T> y, dx;
  std::map<std::string, std::vector<grad_t<T>>> grads;  // global tensors
};

/// Shapes of a block test: global batch [S, B, width_in] → [S, B, width_out].
struct BlockShape {
  std::int64_t seq = 32;
  std::int64_t global_batch = 4;
  std::int64_t width_in = 32;
  std::int64_t width_out = 32;
};

/// Runs `make(groups)` → block; `forward(block, x, batch)` → y; `block.backward(dy)` → dx on
/// the single rank (the reference) and on every folding of `foldings`, and checks that output,
/// input gradient and reduced parameter gradients equal the reference's slices.
template <class T, class Make, class Forward>
void check_equivalence(BlockShape shape, std::vector<Folding> const& foldings, Make make,
                       Forward forward, double tol = 1e-5) {
  auto const x = random_tensor<T>(
      static_cast<std::size_t>(shape.seq * shape.global_batch * shape.width_in), "x");
  auto const g = random_tensor<T>(
      static_cast<std::size_t>(shape.seq * shape.global_batch * shape.width_out), "dy");
  Reference<T> ref;
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks&) {
    Groups groups(mapping_of({}), world);
    auto block = make(groups);
    ref.y = forward(block, std::span<T const>(x), shape.global_batch);
    ref.dx = block.backward(std::span<T const>(g));
    for (auto* p : block.parameters()) ref.grads[p->name] = p->grad;
  });
  for (auto const f : foldings) {
    INFO("folding " << f.str());
    expect_clean<InprocHarness>(f.world(), [&](Comm& world, RankChecks& checks) {
      Groups groups(mapping_of(f), world);
      auto const shard = SequenceShard::of(groups, shape.seq, shape.global_batch / f.dp);
      auto block = make(groups);
      auto const xl = shard.extract(std::span<T const>(x), shape.width_in);
      auto const y = forward(block, std::span<T const>(xl), shard.batch);
      expect_close(checks, y, shard.extract(std::span<T const>(ref.y), shape.width_out), "output",
                   tol);
      auto const gl = shard.extract(std::span<T const>(g), shape.width_out);
      auto const dx = block.backward(std::span<T const>(gl));
      expect_close(checks, dx, shard.extract(std::span<T const>(ref.dx), shape.width_in),
                   "input gradient", tol);
      auto const params = block.parameters();
      reduce_gradients(params, groups);
      for (auto* p : params)
        expect_close(checks, p->grad, p->local_of(std::span<grad_t<T> const>(ref.grads.at(p->name))),
                     "gradient of " + p->name, tol);
    });
  }
}

}  // namespace moefold::test
