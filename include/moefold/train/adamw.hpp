#pragma once
/// \file
/// AdamW (decoupled weight decay, bias-corrected moments), as Megatron's Adam with
/// `weight_decay`: one state per local parameter shard, so every replica that holds the same
/// reduced gradient makes the same update. One-dimensional parameters (norm weights, biases:
/// a global tensor of one row) get no weight decay, as in Megatron.

#include <cmath>
#include <cstdint>
#include <vector>

#include "moefold/core/param.hpp"

namespace moefold {
inline namespace v0 {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};

template <class T>
class AdamW {
 public:
  /// Optimizer state for `params` (zero moments). The list must stay the same.
  AdamW(ParamList<T> params, AdamWConfig config = {}) : params_(std::move(params)), cfg_(config) {
    for (auto* p : params_) {
      exp_avg_.emplace_back(p->size(), 0.0);
      exp_avg_sq_.emplace_back(p->size(), 0.0);
    }
  }

  /// One update with learning rate `lr` from the (reduced, clipped) gradients.
  void step(double lr) {
    ++steps_;
    double const c1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(steps_));
    double const c2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(steps_));
    for (std::size_t k = 0; k < params_.size(); ++k) {
      Param<T>& p = *params_[k];
      bool const decay = p.global_rows > 1;
      auto& m = exp_avg_[k];
      auto& v = exp_avg_sq_[k];
      for (std::size_t i = 0; i < p.size(); ++i) {
        double const g = static_cast<double>(p.grad[i]);
        m[i] = cfg_.beta1 * m[i] + (1.0 - cfg_.beta1) * g;
        v[i] = cfg_.beta2 * v[i] + (1.0 - cfg_.beta2) * g * g;
        double w = static_cast<double>(p.value[i]);
        if (decay) w -= lr * cfg_.weight_decay * w;
        w -= lr * (m[i] / c1) / (std::sqrt(v[i] / c2) + cfg_.eps);
        p.value[i] = static_cast<T>(w);
      }
    }
  }

  std::int64_t steps() const noexcept { return steps_; }
  void set_steps(std::int64_t s) noexcept { steps_ = s; }
  ParamList<T> const& params() const noexcept { return params_; }
  /// First and second moments of parameter k (same layout as its value), for checkpoints.
  std::vector<double>& exp_avg(std::size_t k) { return exp_avg_.at(k); }
  std::vector<double>& exp_avg_sq(std::size_t k) { return exp_avg_sq_.at(k); }

 private:
  ParamList<T> params_;
  AdamWConfig cfg_;
  std::int64_t steps_ = 0;
  std::vector<std::vector<double>> exp_avg_, exp_avg_sq_;
};

}  // namespace v0
}  // namespace moefold
