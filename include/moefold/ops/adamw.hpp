#pragma once
/// \file
/// The AdamW update of one parameter element (decoupled weight decay, bias-corrected moments),
/// as a body: the optimizer (train/adamw.hpp) launches it once per parameter shard. The moments
/// are stored in their own type `M` (FP32 in training, as Megatron); the element's update is
/// computed in double and rounded on store. The bias corrections c1 = 1 − β1^t and
/// c2 = 1 − β2^t come in as plain numbers.
///
///   ops::adamw_update(exec, ops::AdamWStep{.lr = lr, .beta1 = 0.9, …, .c1 = c1, .c2 = c2},
///                     value, grad, exp_avg, exp_avg_sq);

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// The scalars of one AdamW step of one parameter.
struct AdamWStep {
  double lr = 0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0;
  double c1 = 1;       ///< 1 − β1^t
  double c2 = 1;       ///< 1 − β2^t
  bool decay = false;  ///< whether the parameter gets weight decay (not 1-D ones)
};

/// m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²; w ← w − lr·wd·w (with decay);
/// w ← w − lr·(m/c1)/(√(v/c2) + ε), in double, element i; m and v stored as `M`.
template <class T, class M = double>
struct AdamWUpdate {
  T* value;
  T const* grad;
  M* m;
  M* v;
  AdamWStep s;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    using std::sqrt;
    double const g = static_cast<double>(grad[i]);
    double const mi = s.beta1 * static_cast<double>(m[i]) + (1.0 - s.beta1) * g;
    double const vi = s.beta2 * static_cast<double>(v[i]) + (1.0 - s.beta2) * g * g;
    m[i] = static_cast<M>(mi);
    v[i] = static_cast<M>(vi);
    double w = static_cast<double>(value[i]);
    if (s.decay) w -= s.lr * s.weight_decay * w;
    w -= s.lr * (static_cast<double>(m[i]) / s.c1) / (sqrt(static_cast<double>(v[i]) / s.c2) + s.eps);
    value[i] = static_cast<T>(w);
  }
};

/// One AdamW step over a parameter shard: value, grad and both moments hold the same n elements.
template <class Exec, class T, class M>
void adamw_update(Exec const& exec, AdamWStep const& step,
                  View<T, typename Exec::memory_space> value,
                  View<T const, typename Exec::memory_space> grad,
                  View<M, typename Exec::memory_space> exp_avg,
                  View<M, typename Exec::memory_space> exp_avg_sq) {
  MOEFOLD_EXPECTS(value.contiguous() && grad.contiguous() && exp_avg.contiguous() &&
                      exp_avg_sq.contiguous() && grad.size() == value.size() &&
                      exp_avg.size() == value.size() && exp_avg_sq.size() == value.size(),
                  "ops::adamw_update: value {}, grad {}, exp_avg {}, exp_avg_sq {} elements "
                  "(contiguous, equal sizes needed)",
                  value.size(), grad.size(), exp_avg.size(), exp_avg_sq.size());
  for_each(exec, value.size(),
           AdamWUpdate<T, M>{value.data(), grad.data(), exp_avg.data(), exp_avg_sq.data(), step});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
