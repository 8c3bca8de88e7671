#pragma once
/// \file
/// `RowParallelLinear`: Y = X·Wᵀ with W `[out, in]` split by columns (input features) over
/// `tp`, with sequence parallelism: the partial products of the TP ranks are reduce-scattered
/// over `tp`, so each rank ends with its SP-local tokens.
///
///   forward:  X [T·TP, in/TP] ──GEMM──▶ partial [T·TP, out] ──reduce-scatter tp──▶ y [T, out]
///   backward: dy [T, out] ──all-gather tp──▶ dY [T·TP, out] ──GEMM──▶ dX [T·TP, in/TP];
///             dW += dYᵀ·X

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/core/param.hpp"

namespace moefold {
inline namespace v0 {

/// Row-parallel linear with sequence parallelism over `tp` (`LinearConfig::parts` must be 1).
template <class T, Communicator Comm>
class RowParallelLinear {
 public:
  /// Throws `invalid_config` when in is not divisible by TP.
  RowParallelLinear(LinearConfig cfg, Comm& tp) : cfg_(std::move(cfg)), tp_(&tp) {
    std::string const layer = "RowParallelLinear '" + cfg_.name + "'";
    MOEFOLD_EXPECTS(cfg_.in > 0 && cfg_.out > 0 && cfg_.parts == 1,
                    "{}: sizes must be positive and parts 1 (in {}, out {}, parts {})", layer,
                    cfg_.in, cfg_.out, cfg_.parts);
    detail::require_divisible(cfg_.in, tp.size(), layer, "in_features", "TP");
    std::int64_t const n = cfg_.in / tp.size();
    weight_ = Param<T>(cfg_.name, ParamClass::dense, cfg_.out, cfg_.in,
                       {{.row0 = 0, .rows = cfg_.out, .col0 = tp.rank() * n, .cols = n}});
    weight_.init(cfg_.seed, cfg_.dist, cfg_.scale);
  }

  /// Input features on this rank: in/TP.
  std::int64_t local_in() const noexcept { return cfg_.in / tp_->size(); }
  std::int64_t out_features() const noexcept { return cfg_.out; }

  /// x [T·TP, in/TP] (every CP-local token, this rank's features) → y [T, out] (SP-local).
  /// Collective over `tp`.
  std::vector<T> forward(std::span<T const> x) {
    rows_ = detail::rows_of(x.size(), local_in(), "RowParallelLinear " + cfg_.name);
    MOEFOLD_EXPECTS(rows_ % tp_->size() == 0,
                    "RowParallelLinear {}: {} tokens cannot be reduce-scattered over TP = {}",
                    cfg_.name, rows_, tp_->size());
    x_.assign(x.begin(), x.end());
    std::vector<T> partial(static_cast<std::size_t>(rows_ * cfg_.out));
    gemm<T>(Trans::no, Trans::yes, rows_, cfg_.out, local_in(), T{1}, x_.data(), local_in(),
            weight_.value.data(), local_in(), T{0}, partial.data(), cfg_.out);
    std::vector<T> y(partial.size() / static_cast<std::size_t>(tp_->size()));
    tp_->reduce_scatter(detail::cspan(partial), std::span<T>(y));
    return y;
  }

  /// dy [T, out] (SP-local) → dx [T·TP, in/TP]; accumulates the weight gradient.
  /// Collective over `tp`.
  std::vector<T> backward(std::span<T const> dy) {
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(dy.size()) * tp_->size() == rows_ * cfg_.out,
                    "RowParallelLinear {}: backward got {} elements, forward produced {}×{}",
                    cfg_.name, dy.size(), rows_ / tp_->size(), cfg_.out);
    std::vector<T> dy_full(static_cast<std::size_t>(rows_ * cfg_.out));
    tp_->all_gather(dy, std::span<T>(dy_full));
    gemm<T>(Trans::yes, Trans::no, cfg_.out, local_in(), rows_, T{1}, dy_full.data(), cfg_.out,
            x_.data(), local_in(), T{1}, weight_.grad.data(), local_in());
    std::vector<T> dx(static_cast<std::size_t>(rows_ * local_in()));
    gemm<T>(Trans::no, Trans::no, rows_, local_in(), cfg_.out, T{1}, dy_full.data(), cfg_.out,
            weight_.value.data(), local_in(), T{0}, dx.data(), local_in());
    return dx;
  }

  Param<T>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

 private:
  LinearConfig cfg_;
  Comm* tp_;
  Param<T> weight_;
  std::vector<T> x_;
  std::int64_t rows_ = 0;
};

}  // namespace v0
}  // namespace moefold
