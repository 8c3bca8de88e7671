#pragma once
/// \file
/// The `PipelineSchedule` concept: a pipeline schedule as pure data. A model tells, for each
/// pipeline stage (PP rank), the ordered list of actions that stage runs in one training step;
/// the executor runs that list over the `pp` group, and `simulate` runs it on a logical clock.

#include <concepts>
#include <vector>

#include "moefold/pipeline/pipeline_action.hpp"

namespace moefold {
inline namespace v0 {

/// A pipeline schedule: `num_stages()` PP ranks, each holding `num_chunks()` model chunks,
/// running `num_microbatches()` microbatches. `validate()` throws `invalid_config` naming the
/// broken rule; `warmup(stage)` is the number of forwards the stage runs before its first
/// backward; `actions(stage)` is the stage's full ordered list (see `PipelineAction` for the
/// contract), and `compute_order(stage)` its forward/backward entries alone.
template <class S>
concept PipelineSchedule = requires(S const& s, int stage) {
  {s.validate()};
  { s.num_stages() } -> std::convertible_to<int>;
  { s.num_chunks() } -> std::convertible_to<int>;
  { s.num_microbatches() } -> std::convertible_to<int>;
  { s.warmup(stage) } -> std::convertible_to<int>;
  { s.compute_order(stage) } -> std::same_as<std::vector<PipelineAction>>;
  { s.actions(stage) } -> std::same_as<std::vector<PipelineAction>>;
};

}  // namespace v0
}  // namespace moefold
