#pragma once
/// \file
/// `RMSNorm`: y = x / sqrt(mean(x²) + eps) ⊙ w, per token. Local work only: under sequence
/// parallelism each TP rank normalizes its own tokens, so the weight is replicated across `tp`
/// (class `tp_replicated`): its gradient must be summed over `tp` (spec §4.3 item 2) in addition
/// to the `dp_cp` reduction of every dense parameter.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/core/init.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/core/param.hpp"

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

/// Root-mean-square normalization over the hidden dimension of `[T, H]` tokens.
template <class T>
class RMSNorm {
 public:
  explicit RMSNorm(RMSNormConfig cfg) : cfg_(std::move(cfg)) {
    MOEFOLD_EXPECTS(cfg_.hidden > 0, "RMSNorm '{}': hidden size must be positive (got {})",
                    cfg_.name, cfg_.hidden);
    weight_ = Param<T>::whole(cfg_.name, ParamClass::tp_replicated, 1, cfg_.hidden);
    weight_.init(cfg_.seed, cfg_.dist, cfg_.scale);
  }

  /// x [T, H] → y [T, H]; keeps x and 1/rms for backward.
  std::vector<T> forward(std::span<T const> x) {
    std::int64_t const h = cfg_.hidden;
    std::int64_t const rows = detail::rows_of(x.size(), h, "RMSNorm " + cfg_.name);
    x_.assign(x.begin(), x.end());
    rstd_.resize(static_cast<std::size_t>(rows));
    std::vector<T> y(x.size());
    for (std::int64_t r = 0; r < rows; ++r) {
      T const* xr = x_.data() + r * h;
      double ss = 0;
      for (std::int64_t i = 0; i < h; ++i) ss += double(xr[i]) * double(xr[i]);
      T const rs = static_cast<T>(1.0 / std::sqrt(ss / double(h) + cfg_.eps));
      rstd_[static_cast<std::size_t>(r)] = rs;
      for (std::int64_t i = 0; i < h; ++i)
        y[static_cast<std::size_t>(r * h + i)] =
            xr[i] * rs * weight_.value[static_cast<std::size_t>(i)];
    }
    return y;
  }

  /// dy [T, H] → dx [T, H]; accumulates this rank's part of the weight gradient.
  std::vector<T> backward(std::span<T const> dy) {
    std::int64_t const h = cfg_.hidden;
    MOEFOLD_EXPECTS(dy.size() == x_.size(), "RMSNorm {}: backward got {} elements, forward {}",
                    cfg_.name, dy.size(), x_.size());
    std::int64_t const rows = static_cast<std::int64_t>(rstd_.size());
    std::vector<T> dx(dy.size());
    auto const& w = weight_.value;
    for (std::int64_t r = 0; r < rows; ++r) {
      T const* xr = x_.data() + r * h;
      T const* gr = dy.data() + r * h;
      T const rs = rstd_[static_cast<std::size_t>(r)];
      // x̂ = x·rs; dx = rs·(g⊙w − x̂·mean(g⊙w⊙x̂))
      double dot = 0;
      for (std::int64_t i = 0; i < h; ++i) {
        auto const k = static_cast<std::size_t>(i);
        T const xh = xr[i] * rs;
        weight_.grad[k] += gr[i] * xh;
        dot += double(gr[i] * w[k]) * double(xh);
      }
      T const m = static_cast<T>(dot / double(h));
      for (std::int64_t i = 0; i < h; ++i) {
        auto const k = static_cast<std::size_t>(i);
        dx[static_cast<std::size_t>(r * h + i)] = rs * (gr[i] * w[k] - xr[i] * rs * m);
      }
    }
    return dx;
  }

  Param<T>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

 private:
  RMSNormConfig cfg_;
  Param<T> weight_;
  std::vector<T> x_;
  std::vector<T> rstd_;
};

}  // namespace v0
}  // namespace moefold
