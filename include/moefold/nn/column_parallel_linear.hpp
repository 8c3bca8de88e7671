#pragma once
/// \file
/// `ColumnParallelLinear`: Y = X·Wᵀ with W `[out, in]` split by rows (output features) over
/// `tp`, with sequence parallelism: the input is this rank's SP-local tokens, all-gathered over
/// `tp` before the GEMM; the output holds every CP-local token and this rank's output features.
///
///   forward:  x [T, in] ──all-gather tp──▶ X [T·TP, in] ──GEMM──▶ Y [T·TP, out/TP]
///   backward: dY ──GEMM──▶ dX [T·TP, in] ──reduce-scatter tp──▶ dx [T, in];  dW += dYᵀ·X
///
/// The output dimension may be made of `parts` stacked segments that are each split over TP
/// (SwiGLU's fc1 = [gate; up]): rank t then holds rows [t·n, (t+1)·n) of every segment, stored
/// segment after segment, as Megatron's per-rank fc1 shard.

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/init.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/microbatch_stash.hpp"

namespace moefold {
inline namespace v0 {

/// Sizes and initialization of a parallel linear layer (no bias, as in Megatron's MoE models).
struct LinearConfig {
  std::string name;        ///< parameter name of the weight, e.g. "layers.0.mlp.linear_fc1.weight"
  std::int64_t in = 0;     ///< in_features
  std::int64_t out = 0;    ///< out_features (all parts together)
  std::int64_t parts = 1;  ///< stacked output segments, each split over TP (2 for gate/up)
  std::uint64_t seed = 0;
  InitDist dist = InitDist::normal;
  double scale = 0.02;
};

/// Column-parallel linear with sequence parallelism over `tp`.
template <ExecutionInstance Exec, class T, Communicator Comm>
class ColumnParallelLinear {
 public:
  using Space = typename Exec::memory_space;

  /// Throws `invalid_config` when out is not divisible by parts·TP.
  ColumnParallelLinear(Exec exec, LinearConfig cfg, Comm& tp)
      : exec_(std::move(exec)), cfg_(std::move(cfg)), tp_(&tp) {
    std::string const layer = "ColumnParallelLinear '" + cfg_.name + "'";
    MOEFOLD_EXPECTS(cfg_.in > 0 && cfg_.out > 0 && cfg_.parts > 0,
                    "{}: sizes must be positive (in {}, out {}, parts {})", layer, cfg_.in,
                    cfg_.out, cfg_.parts);
    detail::require_divisible(cfg_.out, cfg_.parts * tp.size(), layer, "out_features", "parts·TP");
    std::int64_t const seg = cfg_.out / cfg_.parts, n = seg / tp.size();
    std::vector<ParamBlock> blocks;
    for (std::int64_t p = 0; p < cfg_.parts; ++p)
      blocks.push_back({.row0 = p * seg + tp.rank() * n, .rows = n, .col0 = 0, .cols = cfg_.in});
    weight_ = Param<T, Space>(cfg_.name, ParamClass::dense, cfg_.out, cfg_.in, std::move(blocks));
    weight_.init(cfg_.seed, cfg_.dist, cfg_.scale);
  }
  ColumnParallelLinear(LinearConfig cfg, Comm& tp) requires std::default_initializable<Exec>
      : ColumnParallelLinear(Exec{}, std::move(cfg), tp) {}

  std::int64_t in_features() const noexcept { return cfg_.in; }
  /// Output features on this rank: out/TP.
  std::int64_t local_out() const noexcept { return cfg_.out / tp_->size(); }
  /// Rows of the output of `tokens` SP-local input tokens: tokens·TP.
  std::int64_t out_rows(std::int64_t tokens) const noexcept { return tokens * tp_->size(); }

  /// x: this rank's SP-local tokens [T, in] → y [T·TP, out/TP]. Keeps the gathered input for
  /// backward. Collective over `tp`.
  void forward(View<T const, Space> x, View<T, Space> y) {
    std::int64_t const t = detail::rows_of(x, cfg_.in, "ColumnParallelLinear " + cfg_.name);
    rows_ = t * tp_->size();
    MOEFOLD_EXPECTS(y.size() == rows_ * local_out(),
                    "ColumnParallelLinear {}: output of {} elements, expected {}×{}", cfg_.name,
                    y.size(), rows_, local_out());
    detail::reuse(exec_, x_full_, rows_ * cfg_.in);
    tp_->all_gather(std::span<T const>(x), std::span<T>(x_full_));
    gemm<T>(exec_, Trans::no, Trans::yes, 1, x_full_.view(rows_, cfg_.in),
            weight_.value.view(local_out(), cfg_.in), 0,
            detail::flat(y).reshaped(rows_, local_out()));
  }
  Buffer<T, Space> forward(View<T const, Space> x) {
    std::int64_t const t = detail::rows_of(x, cfg_.in, "ColumnParallelLinear " + cfg_.name);
    return detail::allocated<T>(exec_, out_rows(t) * local_out(),
                                [&](View<T, Space> y) { forward(x, y); });
  }

  /// dy [T·TP, out/TP] → dx [T, in] (this rank's SP-local tokens); accumulates the weight
  /// gradient. Collective over `tp`.
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    MOEFOLD_EXPECTS(dy.size() == rows_ * local_out() && dy.contiguous(),
                    "ColumnParallelLinear {}: backward got {} elements, forward produced {}×{}",
                    cfg_.name, dy.size(), rows_, local_out());
    MOEFOLD_EXPECTS(dx.size() * tp_->size() == rows_ * cfg_.in,
                    "ColumnParallelLinear {}: input gradient of {} elements, expected {}×{}",
                    cfg_.name, dx.size(), rows_ / tp_->size(), cfg_.in);
    auto const dyv = dy.reshaped(rows_, local_out());
    gemm<T>(exec_, Trans::yes, Trans::no, 1, dyv, x_full_.view(rows_, cfg_.in), 1,
            weight_.grad.view(local_out(), cfg_.in));
    auto const dx_full = detail::reuse(exec_, dx_full_, rows_ * cfg_.in);
    gemm<T>(exec_, Trans::no, Trans::no, 1, dyv, weight_.value.view(local_out(), cfg_.in), 0,
            dx_full.reshaped(rows_, cfg_.in));
    tp_->reduce_scatter(std::span<T const>(View<T const, Space>(dx_full)),
                        std::span<T>(detail::flat(dx)));
  }
  Buffer<T, Space> backward(View<T const, Space> dy) {
    return detail::allocated<T>(exec_, rows_ / tp_->size() * cfg_.in,
                                [&](View<T, Space> dx) { backward(dy, dx); });
  }

  Param<T, Space>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

  /// Per-microbatch saved tensors (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

 private:
  auto saved() { return std::tie(x_full_, rows_); }

  Exec exec_;
  LinearConfig cfg_;
  Comm* tp_;
  Param<T, Space> weight_;
  Buffer<T, Space> x_full_, dx_full_;
  std::int64_t rows_ = 0;
  MicrobatchStash stash_;
};

namespace cpu {
template <class T, Communicator Comm>
using ColumnParallelLinear = moefold::ColumnParallelLinear<Cpu, T, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
