#pragma once
// Wall-clock time per phase of a step on one rank (a rank is a thread under inproc, a process
// under MPI): the MLP slot is wrapped in `TimedBlock`, the pipeline stage in `TimedStage`.

#include <chrono>
#include <span>
#include <utility>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/pipeline/executor.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/core/param.hpp"

namespace moefold::train_demo {

struct PhaseTimes {
  double compute = 0;    ///< inside the stage's forward and backward (incl. recomputation)
  double mlp = 0;        ///< inside the MLP slot (experts, or the dense stand-in)
  double dispatch = 0;   ///< token dispatch (MoE: permute + all-to-all), when the block reports it
  double combine = 0;    ///< token combine (MoE: all-to-all back + unpermute)
  double pipeline = 0;   ///< inside run_pipeline (compute + waiting for neighbours)
  double optimizer = 0;  ///< gradient reduction, clipping, AdamW
};

/// The phase counters of the calling rank (thread).
inline PhaseTimes& phase_times() {
  thread_local PhaseTimes t;
  return t;
}

class Stopwatch {
 public:
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// A `TokenBlock` that times the block it wraps (same config, parameters and results).
template <class Inner>
class TimedBlock {
 public:
  using Config = typename Inner::Config;
  template <class Comm>
  TimedBlock(Config cfg, ProcessGroups<Comm>& groups) : inner_(std::move(cfg), groups) {}

  template <class T>
  std::vector<T> forward(std::span<T const> x, ForwardContext const& ctx) {
    Stopwatch w;
    auto y = inner_.forward(x, ctx);
    phase_times().mlp += w.seconds();
    return y;
  }
  template <class T>
  std::vector<T> backward(std::span<T const> dy) {
    Stopwatch w;
    auto dx = inner_.backward(dy);
    phase_times().mlp += w.seconds();
    return dx;
  }
  auto parameters() { return inner_.parameters(); }
  Inner& inner() noexcept { return inner_; }
  // The MoE layer's per-step state, for DecoderStage and the step finalizer.
  double aux_loss() const noexcept { return inner_.aux_loss(); }
  std::span<std::int64_t> expert_bias_counts() noexcept { return inner_.expert_bias_counts(); }
  void apply_expert_bias_update() { inner_.apply_expert_bias_update(); }
  void reset_step_state() { inner_.reset_step_state(); }
  // Per-microbatch activations (nn/microbatch_stash.hpp).
  void stash(int mb) { inner_.stash(mb); }
  void restore(int mb) { inner_.restore(mb); }
  void drop_stashed() { inner_.drop_stashed(); }

 private:
  Inner inner_;
};

/// A `PipelineStageModel` that times the stage it wraps.
template <class Stage>
class TimedStage {
 public:
  using value_type = typename Stage::value_type;
  using loss_type = pipeline_loss_t<Stage>;
  using T = value_type;
  explicit TimedStage(Stage& s) : stage_(&s) {}
  std::size_t activation_size() const { return stage_->activation_size(); }
  template <class U>  // activations, or the last stage's loss
  void forward(int mb, int chunk, std::span<T const> in, std::span<U> out) {
    Stopwatch w;
    stage_->forward(mb, chunk, in, out);
    phase_times().compute += w.seconds();
  }
  void backward(int mb, int chunk, std::span<T const> out_grad, std::span<T> in_grad) {
    Stopwatch w;
    stage_->backward(mb, chunk, out_grad, in_grad);
    phase_times().compute += w.seconds();
  }

 private:
  Stage* stage_;
};

}  // namespace moefold::train_demo
