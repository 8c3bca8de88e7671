#pragma once
/// \file
/// `RmsNorm`: y = x / sqrt(mean(x²) + eps) ⊙ w, per token. Local work only: under sequence
/// parallelism each TP rank normalizes its own tokens, so the weight is replicated across `tp`
/// (class `tp_replicated`): its gradient must be summed over `tp` (spec §4.3 item 2) in addition
/// to the `dp_cp` reduction of every dense parameter. The math is ops/rms_norm.hpp's.

#include <concepts>
#include <cstdint>
#include <string>
#include <utility>

#include "moefold/core/buffer.hpp"
#include "moefold/core/init.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/rms_norm.hpp"

namespace moefold {
inline namespace v0 {

struct RMSNormConfig {
  std::string name;  ///< parameter name, e.g. "layers.0.input_layernorm.weight"
  std::int64_t hidden = 0;
  double eps = 1e-5;
  std::uint64_t seed = 0;
  InitDist dist = InitDist::constant;  ///< Megatron initializes norm weights to 1
  double scale = 1.0;
};
using RmsNormConfig = RMSNormConfig;

/// Root-mean-square normalization over the hidden dimension of `[T, H]` tokens.
template <ExecutionInstance Exec, class T>
class RmsNorm {
 public:
  using Space = typename Exec::memory_space;

  RmsNorm(Exec exec, RMSNormConfig cfg) : exec_(std::move(exec)), cfg_(std::move(cfg)) {
    MOEFOLD_EXPECTS(cfg_.hidden > 0, "RMSNorm '{}': hidden size must be positive (got {})",
                    cfg_.name, cfg_.hidden);
    weight_ = Param<T, Space>::whole(cfg_.name, ParamClass::tp_replicated, 1, cfg_.hidden);
    weight_.init(cfg_.seed, cfg_.dist, cfg_.scale);
  }
  explicit RmsNorm(RMSNormConfig cfg) requires std::default_initializable<Exec>
      : RmsNorm(Exec{}, std::move(cfg)) {}

  /// x [T, H] → y [T, H] (written into `y`); keeps x and 1/rms for backward.
  void forward(View<T const, Space> x, View<T, Space> y) {
    std::int64_t const h = cfg_.hidden;
    std::int64_t const rows = detail::rows_of(x, h, "RMSNorm " + cfg_.name);
    MOEFOLD_EXPECTS(y.size() == x.size(), "RMSNorm {}: output of {} elements for {} inputs",
                    cfg_.name, y.size(), x.size());
    copy(exec_, detail::flat(x), detail::reuse(exec_, x_, x.size()));
    detail::reuse(exec_, rstd_, rows);
    ops::rms_norm_forward(exec_, x_.view(rows, h), weight_.value, cfg_.eps, rstd_.view(),
                          detail::flat(y).reshaped(rows, h));
  }
  Buffer<T, Space> forward(View<T const, Space> x) {
    return detail::allocated<T>(exec_, x.size(), [&](View<T, Space> y) { forward(x, y); });
  }

  /// dy [T, H] → dx [T, H] (written into `dx`); accumulates this rank's part of the weight
  /// gradient.
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    std::int64_t const h = cfg_.hidden;
    MOEFOLD_EXPECTS(dy.size() == static_cast<std::int64_t>(x_.size()) && dx.size() == dy.size(),
                    "RMSNorm {}: backward got {} elements (output {}), forward {}", cfg_.name,
                    dy.size(), dx.size(), x_.size());
    std::int64_t const rows = static_cast<std::int64_t>(rstd_.size());
    ops::rms_norm_backward(exec_, x_.view().reshaped(rows, h), rstd_, weight_.value,
                           detail::flat(dy).reshaped(rows, h), detail::flat(dx).reshaped(rows, h),
                           weight_.grad.view());
  }
  Buffer<T, Space> backward(View<T const, Space> dy) {
    return detail::allocated<T>(exec_, dy.size(), [&](View<T, Space> dx) { backward(dy, dx); });
  }

  Param<T, Space>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

  /// Per-microbatch saved tensors (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

 private:
  auto saved() { return std::tie(x_, rstd_); }

  Exec exec_;
  RMSNormConfig cfg_;
  Param<T, Space> weight_;
  Buffer<T, Space> x_;
  Buffer<compute_t<T>, Space> rstd_;
  MicrobatchStash stash_;
};

namespace cpu {
template <class T>
using RmsNorm = moefold::RmsNorm<Cpu, T>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
