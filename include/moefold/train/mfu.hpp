#pragma once
/// \file
/// Model FLOPs utilization, as Megatron logs throughput: the model FLOPs of a step
/// (Megatron's `num_floating_point_operations`, `plan/flops.hpp`), the FLOP/s each rank achieved,
/// and their ratio to a GEMM peak *measured* on the rank's execution instance:
///
///   double const peak = gemm_peak_flops(exec, 256, 20, barrier);  // every rank at once
///   Mfu const m = mfu(flops_per_step, step_seconds, world_size, peak);
///
/// Measuring the peak with every rank's instance busy at the same time gives the rate a rank
/// can reach while its peers compute too (in-process ranks share the machine's cores), so the
/// ratio is the fraction of the attainable dense-GEMM rate the step reached.

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {

/// No synchronization: `gemm_peak_flops` on one instance alone.
struct NoSync {
  void operator()() const noexcept {}
};

/// The dense fp32 GEMM rate of `exec` in FLOP/s: `reps` n×n×n GEMMs (2n³ FLOPs each, after one
/// warm-up) between two calls of `sync`, timed from the first call's return to the second's.
/// Ranks that share a machine pass a barrier of all of them as `sync`: the rate is then what a
/// rank reaches while every other rank runs GEMMs too.
template <ExecutionInstance Exec, class Sync = NoSync>
double gemm_peak_flops(Exec const& exec, std::int64_t n = 256, int reps = 20, Sync&& sync = {}) {
  MOEFOLD_EXPECTS(n >= 1 && reps >= 1, "gemm_peak_flops: n = {} and reps = {} must be ≥ 1", n,
                  reps);
  auto a = exec.template allocate<float>(n * n);
  auto b = exec.template allocate<float>(n * n);
  auto c = exec.template allocate<float>(n * n);
  ops::fill(exec, a.view(), 0.5f);
  ops::fill(exec, b.view(), 0.25f);
  auto once = [&] {
    gemm<float>(exec, Trans::no, Trans::no, 1.0f, a.view(n, n), b.view(n, n), 0.0f,
                c.view(n, n));
  };
  once();  // warm-up: first-touch pages, BLAS thread set-up
  exec.fence();
  sync();
  auto const t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r) once();
  exec.fence();
  sync();
  double const seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double const flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) *
                       static_cast<double>(n) * reps;
  return flops / std::max(seconds, 1e-12);
}

/// Throughput of a training step, per rank.
struct Mfu {
  double flops_per_rank = 0;  ///< achieved model FLOP/s per rank
  double peak_per_rank = 0;   ///< the measured GEMM rate per rank
  double ratio = 0;           ///< flops_per_rank / peak_per_rank
};

/// MFU of a step of `model_flops` (whole model, global batch) that took `seconds` on `ranks`
/// ranks, each able to reach `peak_per_rank` FLOP/s.
inline Mfu mfu(double model_flops, double seconds, int ranks, double peak_per_rank) {
  MOEFOLD_EXPECTS(model_flops >= 0 && seconds > 0 && ranks >= 1 && peak_per_rank > 0,
                  "mfu: model FLOPs {}, seconds {}, ranks {} and peak {} must be positive",
                  model_flops, seconds, ranks, peak_per_rank);
  double const per_rank = model_flops / seconds / ranks;
  return {.flops_per_rank = per_rank, .peak_per_rank = peak_per_rank, .ratio = per_rank / peak_per_rank};
}

}  // namespace v0
}  // namespace moefold
