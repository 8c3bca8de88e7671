#pragma once
/// \file
/// The model state one rank holds — weights, gradients, optimizer state — for a precision policy
/// and an optimizer sharding, counted as the library (and Megatron-Core) allocate it:
///
///   precision  weights  gradients         optimizer state per element it keeps
///   fp32       4 B      4 B               8 B: the Adam moments (the weights are the main ones)
///   bf16       2 B      4 B (main_grad)   12 B: FP32 main weights and Adam moments
///
/// Without the distributed optimizer every rank keeps the optimizer state of all its parameters.
/// With it (`--use-distributed-optimizer`) the state of the non-expert parameters (dense and
/// TP-replicated) is sharded over dp_cp and that of the experts over edp — over the intra-partial
/// groups (dp_cp/N, edp/N) with N = `num_distributed_optimizer_instances` > 1. Each kind is one
/// buffer padded to a multiple of lcm(S, 128) elements (S shards, Megatron's bucket padding);
/// rank r owns elements [r·s, (r+1)·s) of it, s = padded/S, so the largest rank keeps
/// min(s, n) elements of a buffer of n. moefold's `DistributedOptimizer` reduce-scatters each
/// buffer into a gradient shard of its own (s FP32 elements, padding included), besides the
/// parameters' gradients; Megatron's reduces within its gradient buffer (`Runtime::megatron`).
///
/// Not counted: each parameter's 64-element alignment inside the buffer (none for shapes that
/// are multiples of 64), several buckets per buffer (`--ddp-bucket-size`).

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// Whose buffers the memory model counts: Megatron-Core's, or moefold's trainer (its
/// distributed optimizer keeps the reduced gradient shards in buffers of their own).
enum class Runtime { megatron, moefold };

constexpr std::string_view name(Runtime r) noexcept {
  return r == Runtime::moefold ? "moefold" : "megatron";
}

/// How a run keeps its model state (Megatron's flags). The defaults are the paper's runs:
/// BF16 with the distributed optimizer, on Megatron-Core.
struct StatePolicy {
  /// --bf16: BF16 weights, FP32 main gradients, FP32 main weights and moments in the optimizer
  /// (Megatron's mixed precision); false: FP32 weights, gradients and moments.
  bool bf16 = true;
  bool use_distributed_optimizer = true;  ///< --use-distributed-optimizer
  int num_distributed_optimizer_instances = 1;
  Runtime runtime = Runtime::megatron;

  /// Bytes of one weight element.
  double weight_bytes() const noexcept { return bf16 ? 2.0 : 4.0; }
  /// Bytes of optimizer state per element it covers.
  double optimizer_bytes() const noexcept { return bf16 ? 12.0 : 8.0; }

  /// Throws `invalid_config` for N < 1, or N > 1 without the distributed optimizer.
  void validate() const {
    if (num_distributed_optimizer_instances < 1)
      throw invalid_config(
          fmt::format("num_distributed_optimizer_instances must be at least 1 "
                      "(got {})",
                      num_distributed_optimizer_instances));
    if (num_distributed_optimizer_instances > 1 && !use_distributed_optimizer)
      throw invalid_config(
          fmt::format("num_distributed_optimizer_instances = {} needs the distributed optimizer "
                      "(--use-distributed-optimizer)",
                      num_distributed_optimizer_instances));
  }
};

/// Parameter elements one rank of a pipeline stage holds, by the group their optimizer state
/// is sharded over.
struct StageParams {
  double non_expert = 0;  ///< dense (TP-sharded) and TP-replicated: dp_cp
  double expert = 0;      ///< routed experts (EP- and ETP-sharded): edp
  double total() const noexcept { return non_expert + expert; }
};

/// Bytes of model state on one rank.
struct StateBytes {
  double weights = 0;
  double gradients = 0;  ///< the parameters' gradients (+ moefold's reduced shards)
  double optimizer = 0;
  double total() const noexcept { return weights + gradients + optimizer; }
};

/// Elements of this rank's shard of a buffer of `n` elements over `shards` ranks, padded to a
/// multiple of lcm(shards, 128) as the distributed optimizer pads each bucket.
inline double shard_elements(double n, long shards) noexcept {
  double const multiple = double(std::lcm(shards, 128L));
  return std::ceil(n / multiple) * multiple / double(shards);
}

/// The state of one rank holding `p`, with dp_cp and edp data-parallel replicas, under `s`
/// (the rank of its shard groups that keeps the most).
inline StateBytes state_bytes(StageParams const& p, long dp_cp, long edp, StatePolicy const& s) {
  StateBytes b;
  b.weights = s.weight_bytes() * p.total();
  b.gradients = 4.0 * p.total();
  if (!s.use_distributed_optimizer) {
    b.optimizer = s.optimizer_bytes() * p.total();
    return b;
  }
  long const n = s.num_distributed_optimizer_instances;
  std::pair<double, long> const buffers[] = {{p.non_expert, dp_cp / n}, {p.expert, edp / n}};
  for (auto const& [elements, shards] : buffers) {
    if (elements <= 0) continue;
    double const shard = shard_elements(elements, shards);
    b.optimizer += s.optimizer_bytes() * std::min(shard, elements);
    if (s.runtime == Runtime::moefold) b.gradients += 4.0 * shard;
  }
  return b;
}

}  // namespace v0
}  // namespace moefold
