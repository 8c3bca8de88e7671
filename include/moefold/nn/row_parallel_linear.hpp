#pragma once
/// \file
/// `RowParallelLinear`: Y = X·Wᵀ with W `[out, in]` split by columns (input features) over
/// `tp`, with sequence parallelism: the partial products of the TP ranks are reduce-scattered
/// over `tp`, so each rank ends with its SP-local tokens.
///
///   forward:  X [T·TP, in/TP] ──GEMM──▶ partial [T·TP, out] ──reduce-scatter tp──▶ y [T, out]
///   backward: dy [T, out] ──all-gather tp──▶ dY [T·TP, out] ──GEMM──▶ dX [T·TP, in/TP];
///             dW += dYᵀ·X

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/microbatch_stash.hpp"

namespace moefold {
inline namespace v0 {

/// Row-parallel linear with sequence parallelism over `tp` (`LinearConfig::parts` must be 1).
template <ExecutionInstance Exec, class T, Communicator Comm>
class RowParallelLinear {
 public:
  using Space = typename Exec::memory_space;

  /// Throws `invalid_config` when in is not divisible by TP.
  RowParallelLinear(Exec exec, LinearConfig cfg, Comm& tp)
      : exec_(std::move(exec)), cfg_(std::move(cfg)), tp_(&tp) {
    std::string const layer = "RowParallelLinear '" + cfg_.name + "'";
    MOEFOLD_EXPECTS(cfg_.in > 0 && cfg_.out > 0 && cfg_.parts == 1,
                    "{}: sizes must be positive and parts 1 (in {}, out {}, parts {})", layer,
                    cfg_.in, cfg_.out, cfg_.parts);
    detail::require_divisible(cfg_.in, tp.size(), layer, "in_features", "TP");
    std::int64_t const n = cfg_.in / tp.size();
    weight_ = Param<T, Space>(cfg_.name, ParamClass::dense, cfg_.out, cfg_.in,
                              {{.row0 = 0, .rows = cfg_.out, .col0 = tp.rank() * n, .cols = n}});
    weight_.init(cfg_.seed, cfg_.dist, cfg_.scale);
  }
  RowParallelLinear(LinearConfig cfg, Comm& tp) requires std::default_initializable<Exec>
      : RowParallelLinear(Exec{}, std::move(cfg), tp) {}

  /// Input features on this rank: in/TP.
  std::int64_t local_in() const noexcept { return cfg_.in / tp_->size(); }
  std::int64_t out_features() const noexcept { return cfg_.out; }

  /// x [T·TP, in/TP] (every CP-local token, this rank's features) → y [T, out] (SP-local).
  /// Collective over `tp`.
  void forward(View<T const, Space> x, View<T, Space> y) {
    rows_ = detail::rows_of(x, local_in(), "RowParallelLinear " + cfg_.name);
    MOEFOLD_EXPECTS(rows_ % tp_->size() == 0,
                    "RowParallelLinear {}: {} tokens cannot be reduce-scattered over TP = {}",
                    cfg_.name, rows_, tp_->size());
    MOEFOLD_EXPECTS(y.size() * tp_->size() == rows_ * cfg_.out,
                    "RowParallelLinear {}: output of {} elements, expected {}×{}", cfg_.name,
                    y.size(), rows_ / tp_->size(), cfg_.out);
    copy(exec_, detail::flat(x), detail::reuse(exec_, x_, x.size()));
    auto const partial = detail::reuse(exec_, partial_, rows_ * cfg_.out);
    gemm<T>(exec_, Trans::no, Trans::yes, 1, x_.view(rows_, local_in()),
            weight_.value.view(cfg_.out, local_in()), 0, partial.reshaped(rows_, cfg_.out));
    tp_->reduce_scatter(std::span<T const>(View<T const, Space>(partial)),
                        std::span<T>(detail::flat(y)));
  }
  Buffer<T, Space> forward(View<T const, Space> x) {
    std::int64_t const rows = detail::rows_of(x, local_in(), "RowParallelLinear " + cfg_.name);
    return detail::allocated<T>(exec_, rows / tp_->size() * cfg_.out,
                                [&](View<T, Space> y) { forward(x, y); });
  }

  /// dy [T, out] (SP-local) → dx [T·TP, in/TP]; accumulates the weight gradient.
  /// Collective over `tp`.
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    MOEFOLD_EXPECTS(dy.size() * tp_->size() == rows_ * cfg_.out,
                    "RowParallelLinear {}: backward got {} elements, forward produced {}×{}",
                    cfg_.name, dy.size(), rows_ / tp_->size(), cfg_.out);
    MOEFOLD_EXPECTS(dx.size() == rows_ * local_in(),
                    "RowParallelLinear {}: input gradient of {} elements, expected {}×{}",
                    cfg_.name, dx.size(), rows_, local_in());
    auto const dy_full = detail::reuse(exec_, dy_full_, rows_ * cfg_.out);
    tp_->all_gather(std::span<T const>(detail::flat(dy)), std::span<T>(dy_full));
    auto const dyv = View<T const, Space>(dy_full).reshaped(rows_, cfg_.out);
    gemm<T>(exec_, Trans::yes, Trans::no, 1, dyv, x_.view(rows_, local_in()), 1,
            weight_.grad.view(cfg_.out, local_in()));
    gemm<T>(exec_, Trans::no, Trans::no, 1, dyv, weight_.value.view(cfg_.out, local_in()), 0,
            detail::flat(dx).reshaped(rows_, local_in()));
  }
  Buffer<T, Space> backward(View<T const, Space> dy) {
    return detail::allocated<T>(exec_, rows_ * local_in(),
                                [&](View<T, Space> dx) { backward(dy, dx); });
  }

  Param<T, Space>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

  /// Per-microbatch saved tensors (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

 private:
  auto saved() { return std::tie(x_, rows_); }

  Exec exec_;
  LinearConfig cfg_;
  Comm* tp_;
  Param<T, Space> weight_;
  Buffer<T, Space> x_, partial_, dy_full_;
  std::int64_t rows_ = 0;
  MicrobatchStash stash_;
};

namespace cpu {
template <class T, Communicator Comm>
using RowParallelLinear = moefold::RowParallelLinear<Cpu, T, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
