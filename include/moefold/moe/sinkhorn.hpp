#pragma once
/// \file
/// Sinkhorn balancing of router logits, as Megatron-Core's `sinkhorn(cost, tol)`
/// (megatron/core/transformer/moe/moe_utils.py), which the S-BASE router
/// (`moe_router_load_balancing_type = "sinkhorn"`) uses in training to *choose* experts: top-k
/// runs on the balanced matrix, while the probabilities that weight the chosen experts come
/// from the plain activation of the logits (sigmoid for k = 1, softmax for k > 1). Megatron runs
/// it under `no_grad`, so it has no backward.
///
/// With C = exp(logits) ([T tokens, E experts]) and d1 = 1 at the start, each iteration is
///
///   d0[t] = (1/T) / (Σ_e d1[e]·C[t,e] + 1e-8)        rows first,
///   d1[e] = (1/E) / (Σ_t d0[t]·C[t,e] + 1e-8)        then columns,
///
/// until the mean of |d1_old − d1| over the E experts is ≤ tol; the result is
/// d1[e]·C[t,e]·d0[t]. After the column step every column sums to ≈ 1/E, and, at convergence,
/// every row to ≈ 1/T. Adding one constant to every logit scales C, which d0 absorbs: the
/// result is unchanged (up to the 1e-8 guards).
///
/// Choose tol well above 1e-8: the guards break the (d0·k, d1/k) symmetry, so d1 keeps drifting
/// by some 1e-8 per iteration and a tol below ~1e-7 may never be reached (Megatron would loop
/// forever).

#include <fmt/format.h>
#include <cstdint>
#include <type_traits>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/sinkhorn.hpp"

namespace moefold {
inline namespace v0 {

/// The guard Megatron adds to every row and column sum before dividing by it.
using ops::kSinkhornEps;

/// The most iterations `sinkhorn` runs by default before giving up. Megatron has no such cap
/// and would loop forever where the iteration does not reach `tol`; we throw instead.
inline constexpr std::int64_t kSinkhornMaxIterations = std::int64_t{1} << 20;

/// Writes Megatron's `sinkhorn(logits, tol)` of the row-major [tokens, experts] `logits` to
/// `out` (same shape; it may alias `logits`) and returns the number of iterations it ran. The
/// steps run as bodies on `exec` (ops/sinkhorn.hpp); the host reads the change after each
/// iteration to decide whether to go on.
///
/// Computed in double whatever `Real` is, and rounded to `Real` once at the end. Megatron's
/// router calls it on float32 (`logits.to(dtype=torch.float32)`), so results agree with it to
/// float rounding, except that exp overflows here above a logit of ≈ 709 rather than ≈ 88, and
/// the iteration count can differ by one where the error lands within rounding of `tol`. As in
/// Megatron, an overflowing or NaN logit makes the whole result NaN (the loop then stops).
///
/// Preconditions: tokens ≥ 0, experts ≥ 1, `logits.size() == out.size() == tokens·experts`,
/// tol > 0, max_iterations ≥ 1. With tokens = 0 it writes nothing and returns 0 (Megatron
/// divides by zero there). Throws `moefold::error` (invalid_argument) on a broken precondition
/// and when `max_iterations` iterations do not bring the error to `tol`. Its temporaries
/// (T·E + T + 2E + 1 doubles) come from `workspace`, grown when too small and reused.
template <class Real, class Exec>
std::int64_t sinkhorn(Exec const& exec, Buffer<double, typename Exec::memory_space>& workspace,
                      std::type_identity_t<View<Real const, typename Exec::memory_space>> logits,
                      std::int64_t tokens, std::int64_t experts,
                      std::type_identity_t<View<Real, typename Exec::memory_space>> out,
                      double tol = 1e-4, std::int64_t max_iterations = kSinkhornMaxIterations) {
  MOEFOLD_EXPECTS(tokens >= 0 && experts >= 1,
                  "sinkhorn: {} tokens and {} experts (need tokens ≥ 0 and experts ≥ 1)", tokens,
                  experts);
  auto const n = tokens * experts;
  MOEFOLD_EXPECTS(logits.size() == n,
                  "sinkhorn: logits hold {} values, but {} tokens × {} experts need {}",
                  logits.size(), tokens, experts, n);
  MOEFOLD_EXPECTS(out.size() == n,
                  "sinkhorn: out holds {} values, but {} tokens × {} experts need {}", out.size(),
                  tokens, experts, n);
  MOEFOLD_EXPECTS(tol > 0, "sinkhorn: tol {} must be positive", tol);
  MOEFOLD_EXPECTS(max_iterations >= 1, "sinkhorn: max_iterations {} must be at least 1",
                  max_iterations);
  MOEFOLD_EXPECTS(logits.contiguous() && out.contiguous(), "sinkhorn: strided views");
  if (tokens == 0) return 0;

  auto const words = n + tokens + 2 * experts + 1;
  if (static_cast<std::int64_t>(workspace.size()) < words)
    workspace = exec.template allocate<double>(words);
  auto const w = workspace.view();
  auto const cost = w.cols(0, n), d0 = w.cols(n, tokens), d1 = w.cols(n + tokens, experts);
  auto const d1_old = w.cols(n + tokens + experts, experts);
  auto const change_dev = w.cols(n + tokens + 2 * experts, 1);
  ops::fill(exec, d0, 1.0);
  ops::fill(exec, d1, 1.0);
  ops::fill(exec, d1_old, 1.0);
  for_each(exec, n, ops::SinkhornCost<Real>{logits.data(), cost.data()});

  // Megatron's `error` starts at 1e9 and the loop runs while error > tol (so a NaN stops it).
  double change = 1e9;
  std::int64_t iterations = 0;
  for (; change > tol; ++iterations) {
    if (iterations == max_iterations)
      throw error(errc::invalid_argument,
                  fmt::format("sinkhorn: mean |Δd1| = {} is still above tol = {} after {} "
                              "iterations ({} tokens × {} experts)",
                              change, tol, iterations, tokens, experts));
    for_each_row(exec, tokens,
                 ops::SinkhornStep{cost.data(), d1.data(), d0.data(), tokens, experts, experts, 1});
    for_each(exec, experts,
             ops::SinkhornStep{cost.data(), d0.data(), d1.data(), experts, tokens, 1, experts});
    for_each(exec, 1, ops::SinkhornChange{d1.data(), d1_old.data(), experts, change_dev.data()});
    copy<double>(exec, View<double const, typename Exec::memory_space>(change_dev),
                 View<double>(&change, 1));
  }
  for_each(exec, n,
           ops::SinkhornResult<Real>{cost.data(), d0.data(), d1.data(), experts, out.data()});
  return iterations;
}
/// `sinkhorn` with a workspace of its own.
template <class Real, class Exec>
std::int64_t sinkhorn(Exec const& exec,
                      std::type_identity_t<View<Real const, typename Exec::memory_space>> logits,
                      std::int64_t tokens, std::int64_t experts,
                      std::type_identity_t<View<Real, typename Exec::memory_space>> out,
                      double tol = 1e-4, std::int64_t max_iterations = kSinkhornMaxIterations) {
  Buffer<double, typename Exec::memory_space> workspace;
  return sinkhorn<Real>(exec, workspace, logits, tokens, experts, out, tol, max_iterations);
}

}  // namespace v0
}  // namespace moefold
