#pragma once
/// \file
/// `PipelineAction`: one entry of a pipeline stage's schedule. A schedule gives every stage an
/// ordered list of these: the forward and backward computations of (microbatch, model chunk), and
/// the point-to-point sends and receives between neighbouring stages that feed them.
///
/// How an executor runs a stage's list (the contract every schedule here is checked against):
///   - compute actions run in list order;
///   - the communication actions between two compute actions form one batch: the executor posts
///     them together (sends first, like torch's batch_isend_irecv) and waits for all of them
///     before the next compute action;
///   - the k-th send on a channel (source stage, destination stage, direction) matches the k-th
///     receive on that channel, so tags need only tell the two directions apart.
/// A receive sits just before the computation that consumes it, a send just after the
/// computation that produces it.

#include <cstdint>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace moefold {
inline namespace v0 {

/// What a pipeline action does. "Forward" traffic flows to the next virtual stage (activations),
/// "backward" traffic to the previous one (activation gradients).
enum class PipelineOp : std::uint8_t {
  forward,        ///< run the forward of (microbatch, chunk)
  backward,       ///< run the backward of (microbatch, chunk)
  recv_forward,   ///< receive from `peer` the input activation of forward (microbatch, chunk)
  send_forward,   ///< send to `peer` the output activation of forward (microbatch, chunk)
  recv_backward,  ///< receive from `peer` the output gradient for backward (microbatch, chunk)
  send_backward,  ///< send to `peer` the input gradient computed by backward (microbatch, chunk)
};

/// The name of an op, as printed by `to_string`.
constexpr std::string_view name(PipelineOp op) noexcept {
  switch (op) {
    case PipelineOp::forward:
      return "forward";
    case PipelineOp::backward:
      return "backward";
    case PipelineOp::recv_forward:
      return "recv_forward";
    case PipelineOp::send_forward:
      return "send_forward";
    case PipelineOp::recv_backward:
      return "recv_backward";
    case PipelineOp::send_backward:
      return "send_backward";
  }
  return "unknown";
}

/// One step of a stage's schedule. `chunk` is always the model chunk on *this* stage: for a send
/// it is the chunk that produced the tensor, for a receive the chunk that will consume it (on the
/// peer the tensor belongs to the neighbouring virtual stage, which may be another chunk).
struct PipelineAction {
  PipelineOp op = PipelineOp::forward;
  int microbatch = 0;  ///< microbatch index, 0 ≤ microbatch < M
  int chunk = 0;       ///< model chunk on this stage, 0 without a virtual pipeline
  int peer = -1;       ///< the other PP rank of a send or receive; -1 for a computation

  /// True for a forward or backward computation, false for a send or receive.
  constexpr bool is_compute() const noexcept {
    return op == PipelineOp::forward || op == PipelineOp::backward;
  }
  /// True for an action that travels in the forward direction (forward, send/recv_forward).
  constexpr bool is_forward_direction() const noexcept {
    return op == PipelineOp::forward || op == PipelineOp::recv_forward ||
           op == PipelineOp::send_forward;
  }

  friend constexpr bool operator==(PipelineAction const&, PipelineAction const&) = default;
};

/// The short label of a computation as Megatron's docs write it: `F3`/`B3`, or `F3c1`/`B3c1`
/// when `with_chunk`. For a send or receive: e.g. `send_forward F3c1 -> 2`, `recv_backward B0
/// <- 1`.
inline std::string to_string(PipelineAction const& a, bool with_chunk) {
  std::string const label =
      fmt::format("{}{}", a.is_forward_direction() ? 'F' : 'B', a.microbatch) +
      (with_chunk ? fmt::format("c{}", a.chunk) : std::string());
  if (a.is_compute()) return label;
  bool const is_send = a.op == PipelineOp::send_forward || a.op == PipelineOp::send_backward;
  return fmt::format("{} {} {} {}", name(a.op), label, is_send ? "->" : "<-", a.peer);
}

}  // namespace v0
}  // namespace moefold
