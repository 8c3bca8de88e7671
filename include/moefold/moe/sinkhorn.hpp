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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>
#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// The guard Megatron adds to every row and column sum before dividing by it.
inline constexpr double kSinkhornEps = 1e-8;

/// The most iterations `sinkhorn` runs by default before giving up. Megatron has no such cap
/// and would loop forever where the iteration does not reach `tol`; we throw instead.
inline constexpr std::int64_t kSinkhornMaxIterations = std::int64_t{1} << 20;

/// Writes Megatron's `sinkhorn(logits, tol)` of the row-major [tokens, experts] `logits` to
/// `out` (same shape; it may alias `logits`) and returns the number of iterations it ran.
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
/// and when `max_iterations` iterations do not bring the error to `tol`.
template <class Real>
std::int64_t sinkhorn(std::span<Real const> logits, std::int64_t tokens, std::int64_t experts,
                      std::span<Real> out, double tol = 1e-4,
                      std::int64_t max_iterations = kSinkhornMaxIterations) {
  MOEFOLD_EXPECTS(tokens >= 0 && experts >= 1,
                  "sinkhorn: {} tokens and {} experts (need tokens ≥ 0 and experts ≥ 1)", tokens,
                  experts);
  auto const n = static_cast<std::size_t>(tokens * experts);
  MOEFOLD_EXPECTS(logits.size() == n,
                  "sinkhorn: logits hold {} values, but {} tokens × {} experts need {}",
                  logits.size(), tokens, experts, n);
  MOEFOLD_EXPECTS(out.size() == n,
                  "sinkhorn: out holds {} values, but {} tokens × {} experts need {}", out.size(),
                  tokens, experts, n);
  MOEFOLD_EXPECTS(tol > 0, "sinkhorn: tol {} must be positive", tol);
  MOEFOLD_EXPECTS(max_iterations >= 1, "sinkhorn: max_iterations {} must be at least 1",
                  max_iterations);
  if (tokens == 0) return 0;

  auto const t_count = static_cast<std::size_t>(tokens);
  auto const e_count = static_cast<std::size_t>(experts);
  std::vector<double> cost(n);
  for (std::size_t i = 0; i < n; ++i) cost[i] = std::exp(static_cast<double>(logits[i]));
  std::vector<double> d0(t_count, 1.0), d1(e_count, 1.0), d1_old(e_count, 1.0);

  // Megatron's `error` starts at 1e9 and the loop runs while error > tol (so a NaN stops it).
  double change = 1e9;
  std::int64_t iterations = 0;
  for (; change > tol; ++iterations) {
    if (iterations == max_iterations)
      throw error(errc::invalid_argument,
                  fmt::format("sinkhorn: mean |Δd1| = {} is still above tol = {} after {} "
                              "iterations ({} tokens × {} experts)",
                              change, tol, iterations, tokens, experts));
    for (std::size_t t = 0; t < t_count; ++t) {
      double s = 0;
      for (std::size_t e = 0; e < e_count; ++e) s += d1[e] * cost[t * e_count + e];
      d0[t] = (1.0 / static_cast<double>(t_count)) / (s + kSinkhornEps);
    }
    std::fill(d1.begin(), d1.end(), 0.0);
    for (std::size_t t = 0; t < t_count; ++t)
      for (std::size_t e = 0; e < e_count; ++e) d1[e] += d0[t] * cost[t * e_count + e];
    for (auto& v : d1) v = (1.0 / static_cast<double>(e_count)) / (v + kSinkhornEps);
    change = 0;
    for (std::size_t e = 0; e < e_count; ++e) change += std::abs(d1_old[e] - d1[e]);
    change /= static_cast<double>(e_count);
    d1_old = d1;
  }
  for (std::size_t t = 0; t < t_count; ++t)
    for (std::size_t e = 0; e < e_count; ++e)
      out[t * e_count + e] = static_cast<Real>(d1[e] * cost[t * e_count + e] * d0[t]);
  return iterations;
}

}  // namespace v0
}  // namespace moefold
