#pragma once
/// \file
/// The `TokenDispatcher` concept, its configuration and its metadata: the plan → dispatch →
/// combine lifecycle that moves tokens from the attention layout (each rank's own tokens) to
/// the experts (grouped by local expert) and back, with the backward of each step.
///
///   auto const& meta = d.plan(routing);          // counts, splits (collective over tp_ep)
///   auto in = d.dispatch(hidden, routing.probs); // in.expert_input [N, H], by local expert
///   auto y  = d.combine(experts(in));            // [T, H]: Σ_k p_k · f_{e_k}(x)
///   auto g  = d.combine_backward(dy);            // d expert_output, d expert_probs
///   auto dx = d.dispatch_backward(d_expert_input, g.d_expert_probs);   // d hidden, d probs
///
/// Probabilities are applied on the expert side inside `combine` (each expert row is scaled by
/// its probability before rows are summed), so experts compute f_e(x) without probs.

#include <concepts>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "moefold/core/memory_space.hpp"
#include "moefold/core/view.hpp"
#include "moefold/moe/routing.hpp"

namespace moefold {
inline namespace v0 {

/// What every dispatcher needs to know. Names follow Megatron where it has them.
struct DispatcherConfig {
  int num_experts = 8;           ///< E (`num_moe_experts`)
  int moe_router_topk = 2;       ///< K
  std::int64_t hidden_size = 0;  ///< H
  /// All-to-all only, dropless or drop without padding: send a token once to each distinct
  /// other EP rank that owns one of its experts and expand it there (as DeepEP does), instead
  /// of once per (token, expert) as Megatron does.
  bool dedup = true;
  /// All-to-all only: on a communicator with peer reads (`has_peer_reads_v`: the in-process
  /// world), host memory and ETP = 1, move rows by reading the peers' buffers in place (one
  /// copy per row in dispatch, one pass in combine; see docs/dispatcher.md). Off: always the
  /// all-to-all collectives (same results, bitwise).
  bool peer_reads = true;
};

/// What `plan` decided, fully determined by the routing of every rank (spec §5).
struct DispatchMetadata {
  int ep_size = 1, etp_size = 1, num_local_experts = 1;
  std::int64_t num_tokens = 0;  ///< T, this rank's tokens
  std::int64_t num_out = 0;     ///< (token, expert) entries this rank routes (incl. padding)
  std::int64_t capacity = -1;   ///< C per expert and source rank; -1 when dropless
  bool padded = false;          ///< drop-and-pad: static shapes, no count exchange
  bool dedup = false;           ///< rows are (token, destination rank) rather than entries
  /// Rows this rank sends to / receives from each EP peer in the token all-to-all `[EP]`
  /// (all-to-all dispatcher only).
  std::vector<std::int64_t> input_splits, output_splits;
  std::vector<std::int64_t> output_splits_tp;  ///< rows each ETP peer received `[ETP]`
  /// NG[t][j][l]: entries that rank (etp t, ep j) routes to my local expert l `[ETP·EP·L]`.
  std::vector<std::int64_t> num_global_tokens_per_local_expert;
  std::vector<std::int64_t> tokens_per_local_expert;  ///< rows of each local expert `[L]`
  /// This rank's entries per expert after token dropping, padding slots included `[E]`: what
  /// Megatron's router adds to its expert-bias counters (spec §2.2 step 7).
  std::vector<std::int64_t> local_tokens_per_expert;
  /// Payload bytes this rank sent to other EP ranks in the forward token all-to-all of the last
  /// `dispatch`, as counted by the `ep` communicator (probabilities and metadata excluded).
  std::uint64_t ep_token_bytes_sent = 0;

  /// N: the rows the local experts process.
  std::int64_t num_expert_rows() const {
    return std::accumulate(tokens_per_local_expert.begin(), tokens_per_local_expert.end(),
                           std::int64_t{0});
  }
};

/// The experts' input: rows grouped by local expert (expert 0's rows first).
template <class Real, MemorySpace Space = HostSpace>
struct DispatchOutput {
  Buffer<Real, Space> expert_input;                   ///< [N, H]
  Buffer<Real, Space> expert_probs;                   ///< [N]
  std::vector<std::int64_t> tokens_per_local_expert;  ///< [L], sums to N (host)
};

/// Gradients returned by `combine_backward`.
template <class Real, MemorySpace Space = HostSpace>
struct CombineGrad {
  Buffer<Real, Space> d_expert_output;  ///< [N, H]
  Buffer<Real, Space> d_expert_probs;   ///< [N]
};

/// Gradients returned by `dispatch_backward`.
template <class Real, MemorySpace Space = HostSpace>
struct DispatchGrad {
  Buffer<Real, Space> d_hidden;  ///< [T, H]
  Buffer<Real, Space> d_probs;   ///< [T, E], zero outside the routed (kept) entries
};

/// A token dispatcher: plan once per routing, then dispatch and combine, forward and backward,
/// over views and buffers of its instance's memory space (`exec_type::memory_space`). Every
/// member is collective over the dispatcher's expert groups.
template <class D>
concept TokenDispatcher =
    requires(D& d, D const& cd,
             Routing<typename D::real_type, typename D::exec_type::memory_space> const& r,
             View<typename D::real_type const, typename D::exec_type::memory_space> x) {
      typename D::real_type;
      typename D::exec_type;
      { d.plan(r) } -> std::same_as<DispatchMetadata const&>;
      { d.dispatch(x, x) } -> std::same_as<
          DispatchOutput<typename D::real_type, typename D::exec_type::memory_space>>;
      { d.combine(x) } -> std::same_as<
          Buffer<typename D::real_type, typename D::exec_type::memory_space>>;
      { d.combine_backward(x) } -> std::same_as<
          CombineGrad<typename D::real_type, typename D::exec_type::memory_space>>;
      { d.dispatch_backward(x, x) } -> std::same_as<
          DispatchGrad<typename D::real_type, typename D::exec_type::memory_space>>;
      { cd.metadata() } -> std::same_as<DispatchMetadata const&>;
    };

}  // namespace v0
}  // namespace moefold
