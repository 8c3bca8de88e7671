#pragma once
/// \file
/// AdamW (decoupled weight decay, bias-corrected moments), as Megatron's Adam with
/// `weight_decay`: one state per local parameter shard, so every replica that holds the same
/// reduced gradient makes the same update. One-dimensional parameters (norm weights, biases:
/// a global tensor of one row) get no weight decay, as in Megatron. The update of each element
/// is the body `ops::AdamWUpdate` (ops/adamw.hpp); the moments are buffers of the instance's
/// memory space in `adam_moment_t<T>`: FP32 for FP32 (and BF16) parameters, as Megatron's Adam;
/// double only for a double model (the finite-difference tier). For a bf16 model the optimizer
/// also keeps FP32 main parameters (Megatron's `--bf16`): the update steps them with the FP32
/// main gradients and writes them back rounded to bf16.

#include <cmath>
#include <concepts>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "moefold/core/param.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/adamw.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {

/// The type of the Adam moments of parameters of type `T`.
template <class T>
using adam_moment_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

/// The update of step `step` (1-based) with learning rate `lr`: `config`'s coefficients, the
/// bias corrections 1 − β^step, and weight decay for `decay` (parameters of more than one row).
inline ops::AdamWStep adamw_step(AdamWConfig const& config, double lr, std::int64_t step,
                                 bool decay) {
  return ops::AdamWStep{.lr = lr,
                        .beta1 = config.beta1,
                        .beta2 = config.beta2,
                        .eps = config.eps,
                        .weight_decay = config.weight_decay,
                        .c1 = 1.0 - std::pow(config.beta1, static_cast<double>(step)),
                        .c2 = 1.0 - std::pow(config.beta2, static_cast<double>(step)),
                        .decay = decay};
}

template <ExecutionInstance Exec, class T>
class AdamW {
 public:
  using memory_space = typename Exec::memory_space;
  using Moments = Buffer<adam_moment_t<T>, memory_space>;
  /// FP32 main parameters (only for a bf16 model).
  using MainParams = Buffer<compute_t<T>, memory_space>;

  /// Optimizer state for `params` (zero moments; main parameters copied from the values) on
  /// `exec`. The list must stay the same.
  AdamW(Exec exec, ParamList<T> params, AdamWConfig config = {})
      : exec_(std::move(exec)), params_(std::move(params)), cfg_(config) {
    for (auto* p : params_) {
      auto const n = static_cast<std::int64_t>(p->size());
      exp_avg_.push_back(exec_.template allocate<adam_moment_t<T>>(n));
      exp_avg_sq_.push_back(exec_.template allocate<adam_moment_t<T>>(n));
      if constexpr (has_main_params_v<T>) main_.push_back(exec_.template allocate<compute_t<T>>(n));
    }
    reload_main_params();
  }
  AdamW(ParamList<T> params, AdamWConfig config = {})
    requires std::default_initializable<Exec>
      : AdamW(Exec{}, std::move(params), config) {}

  /// One update with learning rate `lr` from the (reduced, clipped) gradients.
  void step(double lr) {
    ++steps_;
    for (std::size_t k = 0; k < params_.size(); ++k) {
      Param<T>& p = *params_[k];
      auto const s = adamw_step(cfg_, lr, steps_, p.global_rows > 1);
      if constexpr (has_main_params_v<T>) {
        ops::adamw_update(exec_, s, main_[k].view(), View<grad_t<T> const, memory_space>(p.grad),
                          exp_avg_[k].view(), exp_avg_sq_[k].view());
        ops::convert<Exec, compute_t<T>, T>(exec_, main_[k].view(), View<T, memory_space>(p.value));
      } else {
        ops::adamw_update(exec_, s, View<T, memory_space>(p.value),
                          View<T const, memory_space>(p.grad), exp_avg_[k].view(),
                          exp_avg_sq_[k].view());
      }
    }
  }
  /// Sets the main parameters from the (bf16) values, e.g. after loading weights without
  /// optimizer state; nothing for a model without main parameters.
  void reload_main_params() {
    if constexpr (has_main_params_v<T>)
      for (std::size_t k = 0; k < params_.size(); ++k)
        ops::convert<Exec, T, compute_t<T>>(exec_, View<T const, memory_space>(params_[k]->value),
                                            main_[k].view());
  }

  Exec const& exec() const noexcept { return exec_; }
  std::int64_t steps() const noexcept { return steps_; }
  void set_steps(std::int64_t s) noexcept { steps_ = s; }
  ParamList<T> const& params() const noexcept { return params_; }
  /// First and second moments of parameter k (same layout as its value), for checkpoints.
  Moments& exp_avg(std::size_t k) { return exp_avg_.at(k); }
  Moments& exp_avg_sq(std::size_t k) { return exp_avg_sq_.at(k); }
  /// The FP32 main parameters of parameter k (bf16 models only), for checkpoints.
  MainParams& main_param(std::size_t k)
    requires has_main_params_v<T>
  {
    return main_.at(k);
  }
  /// Bytes of optimizer state (both moments of every parameter, and the FP32 main parameters
  /// of a bf16 model), counted from the buffers.
  std::int64_t state_bytes() const {
    std::int64_t n = 0;
    for (std::size_t k = 0; k < exp_avg_.size(); ++k)
      n += static_cast<std::int64_t>((exp_avg_[k].size() + exp_avg_sq_[k].size()) *
                                     sizeof(typename Moments::value_type));
    for (auto const& m : main_)
      n += static_cast<std::int64_t>(m.size() * sizeof(typename MainParams::value_type));
    return n;
  }

 private:
  Exec exec_;
  ParamList<T> params_;
  AdamWConfig cfg_;
  std::int64_t steps_ = 0;
  std::vector<Moments> exp_avg_, exp_avg_sq_;
  std::vector<MainParams> main_;  // empty unless has_main_params_v<T>
};

namespace cpu {
template <class T>
using AdamW = moefold::AdamW<Cpu, T>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
