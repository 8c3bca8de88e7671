#pragma once
/// \file
/// The one place for the neighbour rule of a (possibly virtual) pipeline, and the builder that
/// inserts the sends and receives around a stage's computations.
///
/// Model chunk `c` on PP rank `p` is virtual stage `c·PP + p` (Megatron's layout). Activations
/// flow from virtual stage v to v+1, gradients from v+1 to v; so the forward neighbour of rank p
/// is rank p+1, except that rank PP−1 hands chunk c to rank 0's chunk c+1 (a ring).

#include <cstddef>
#include <vector>

#include "moefold/pipeline/pipeline_action.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

/// PP stages each holding `chunks` model chunks.
struct VirtualPipeline {
  int stages = 1;
  int chunks = 1;

  constexpr int virtual_stage(int stage, int chunk) const noexcept {
    return chunk * stages + stage;
  }
  /// The first virtual stage reads the data: its forward receives nothing, its backward sends
  /// nothing.
  constexpr bool is_first(int stage, int chunk) const noexcept {
    return virtual_stage(stage, chunk) == 0;
  }
  /// The last virtual stage computes the loss: its forward sends nothing, its backward receives
  /// nothing.
  constexpr bool is_last(int stage, int chunk) const noexcept {
    return virtual_stage(stage, chunk) == stages * chunks - 1;
  }
  constexpr int next_stage(int stage) const noexcept { return (stage + 1) % stages; }
  constexpr int prev_stage(int stage) const noexcept { return (stage + stages - 1) % stages; }
};

/// A stage's full action list from its computations in order: before each computation the
/// receive it needs, after it the send it produces.
inline std::vector<PipelineAction> with_p2p(std::vector<PipelineAction> const& compute, int stage,
                                            VirtualPipeline const& vp) {
  std::vector<PipelineAction> out;
  out.reserve(3 * compute.size());
  for (PipelineAction const& a : compute) {
    int const mb = a.microbatch;
    int const c = a.chunk;
    if (a.op == PipelineOp::forward) {
      if (!vp.is_first(stage, c))
        out.push_back({PipelineOp::recv_forward, mb, c, vp.prev_stage(stage)});
      out.push_back(a);
      if (!vp.is_last(stage, c))
        out.push_back({PipelineOp::send_forward, mb, c, vp.next_stage(stage)});
    } else {
      if (!vp.is_last(stage, c))
        out.push_back({PipelineOp::recv_backward, mb, c, vp.next_stage(stage)});
      out.push_back(a);
      if (!vp.is_first(stage, c))
        out.push_back({PipelineOp::send_backward, mb, c, vp.prev_stage(stage)});
    }
  }
  return out;
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
