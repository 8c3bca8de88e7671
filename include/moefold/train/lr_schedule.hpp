#pragma once
/// \file
/// Learning rate: linear warm-up, then cosine decay to `min_lr` (Megatron's
/// `--lr-warmup-iters`, `--lr-decay-iters`, `--lr-decay-style cosine`, `--min-lr`).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace moefold {
inline namespace v0 {

struct LrSchedule {
  double lr = 3e-4;
  double min_lr = 3e-5;
  std::int64_t warmup_iters = 0;
  std::int64_t decay_iters = 1;  ///< the step at which the rate reaches min_lr

  /// The rate for step `step` (1-based, as Megatron counts).
  double at(std::int64_t step) const noexcept {
    if (warmup_iters > 0 && step <= warmup_iters)
      return lr * static_cast<double>(step) / static_cast<double>(warmup_iters);
    if (step >= decay_iters) return min_lr;
    double const progress = static_cast<double>(step - warmup_iters) /
                            static_cast<double>(std::max<std::int64_t>(decay_iters - warmup_iters, 1));
    double const coeff = 0.5 * (std::cos(std::numbers::pi * progress) + 1.0);
    return min_lr + coeff * (lr - min_lr);
  }
};

}  // namespace v0
}  // namespace moefold
