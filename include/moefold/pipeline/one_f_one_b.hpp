#pragma once
/// \file
/// `OneFOneB`: Megatron's non-interleaved 1F1B schedule (spec §3.1) as data.
///
///   PP=4, M=8        warm-up W = min(PP − rank − 1, M), then one forward / one backward
///   rank 0   F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7
///   rank 3   F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7
///
/// With one stage (PP = 1) nothing is pipelined: W = 0 and the order is F0 B0 F1 B1 …, exactly
/// Megatron's no-pipelining schedule (forward then backward per microbatch).

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/pipeline/detail/virtual_pipeline.hpp"
#include "moefold/pipeline/pipeline_action.hpp"

namespace moefold {
inline namespace v0 {

/// Non-interleaved 1F1B over `stages` PP ranks and `microbatches` microbatches; one model chunk
/// per stage. Any M ≥ 1 is valid. Usage:
/// `for (auto const& a : moefold::OneFOneB{.stages = 4, .microbatches = 8}.actions(rank)) …`
struct OneFOneB {
  int stages = 1;        ///< PP, the number of pipeline stages
  int microbatches = 1;  ///< M, microbatches per step on each stage

  /// Throws `invalid_config` unless PP ≥ 1 and M ≥ 1.
  void validate() const {
    if (stages < 1)
      throw invalid_config(fmt::format("1F1B needs pipeline stages PP ≥ 1 (PP = {})", stages));
    if (microbatches < 1)
      throw invalid_config(fmt::format("1F1B needs microbatches M ≥ 1 (M = {})", microbatches));
  }
  int num_stages() const noexcept { return stages; }
  int num_chunks() const noexcept { return 1; }
  int num_microbatches() const noexcept { return microbatches; }

  /// Warm-up forwards of `stage`: W = min(PP − stage − 1, M).
  int warmup(int stage) const {
    check_stage(stage);
    return std::min(stages - stage - 1, microbatches);
  }

  /// The forwards and backwards of `stage` in order: W warm-up forwards, then for i < M − W
  /// `F(W+i) B(i)`, then the W remaining backwards; first-in, first-out.
  std::vector<PipelineAction> compute_order(int stage) const {
    int const w = warmup(stage);
    int const r = microbatches - w;
    std::vector<PipelineAction> out;
    out.reserve(2 * static_cast<std::size_t>(microbatches));
    for (int i = 0; i < w; ++i) out.push_back({PipelineOp::forward, i});
    for (int i = 0; i < r; ++i) {
      out.push_back({PipelineOp::forward, w + i});
      out.push_back({PipelineOp::backward, i});
    }
    for (int i = 0; i < w; ++i) out.push_back({PipelineOp::backward, r + i});
    return out;
  }

  /// The full action list of `stage`: `compute_order` with the receive before and the send after
  /// each computation (none towards outside the pipeline). Matches Megatron's communication
  /// points: steady-state `send_forward`+`recv_backward` and `send_backward`+`recv_forward`
  /// each form one batch.
  std::vector<PipelineAction> actions(int stage) const {
    return detail::with_p2p(compute_order(stage), stage, {stages, 1});
  }

  /// The ideal idle fraction of 1F1B, (PP − 1) / (M + PP − 1).
  double ideal_bubble_fraction() const {
    validate();
    return static_cast<double>(stages - 1) / (microbatches + stages - 1);
  }

 private:
  void check_stage(int stage) const {
    validate();
    MOEFOLD_EXPECTS(stage >= 0 && stage < stages, "stage {} is outside the pipeline of {} stages",
                    stage, stages);
  }
};

}  // namespace v0
}  // namespace moefold
