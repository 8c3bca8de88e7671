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

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/init.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/core/param.hpp"

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
template <class T, Communicator Comm>
class ColumnParallelLinear {
 public:
  /// Throws `invalid_config` when out is not divisible by parts·TP.
  ColumnParallelLinear(LinearConfig cfg, Comm& tp) : cfg_(std::move(cfg)), tp_(&tp) {
    std::string const layer = "ColumnParallelLinear '" + cfg_.name + "'";
    MOEFOLD_EXPECTS(cfg_.in > 0 && cfg_.out > 0 && cfg_.parts > 0,
                    "{}: sizes must be positive (in {}, out {}, parts {})", layer, cfg_.in,
                    cfg_.out, cfg_.parts);
    detail::require_divisible(cfg_.out, cfg_.parts * tp.size(), layer, "out_features", "parts·TP");
    std::int64_t const seg = cfg_.out / cfg_.parts, n = seg / tp.size();
    std::vector<ParamBlock> blocks;
    for (std::int64_t p = 0; p < cfg_.parts; ++p)
      blocks.push_back({.row0 = p * seg + tp.rank() * n, .rows = n, .col0 = 0, .cols = cfg_.in});
    weight_ = Param<T>(cfg_.name, ParamClass::dense, cfg_.out, cfg_.in, std::move(blocks));
    weight_.init(cfg_.seed, cfg_.dist, cfg_.scale);
  }

  std::int64_t in_features() const noexcept { return cfg_.in; }
  /// Output features on this rank: out/TP.
  std::int64_t local_out() const noexcept { return cfg_.out / tp_->size(); }

  /// x: this rank's SP-local tokens [T, in] → [T·TP, out/TP]. Keeps the gathered input for
  /// backward. Collective over `tp`.
  std::vector<T> forward(std::span<T const> x) {
    std::int64_t const t = detail::rows_of(x.size(), cfg_.in, "ColumnParallelLinear " + cfg_.name);
    rows_ = t * tp_->size();
    x_full_.resize(static_cast<std::size_t>(rows_ * cfg_.in));
    tp_->all_gather(x, std::span<T>(x_full_));
    std::vector<T> y(static_cast<std::size_t>(rows_ * local_out()));
    gemm<T>(Trans::no, Trans::yes, rows_, local_out(), cfg_.in, T{1}, x_full_.data(), cfg_.in,
            weight_.value.data(), cfg_.in, T{0}, y.data(), local_out());
    return y;
  }

  /// dy [T·TP, out/TP] → dx [T, in] (this rank's SP-local tokens); accumulates the weight
  /// gradient. Collective over `tp`.
  std::vector<T> backward(std::span<T const> dy) {
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(dy.size()) == rows_ * local_out(),
                    "ColumnParallelLinear {}: backward got {} elements, forward produced {}×{}",
                    cfg_.name, dy.size(), rows_, local_out());
    gemm<T>(Trans::yes, Trans::no, local_out(), cfg_.in, rows_, T{1}, dy.data(), local_out(),
            x_full_.data(), cfg_.in, T{1}, weight_.grad.data(), cfg_.in);
    std::vector<T> dx_full(static_cast<std::size_t>(rows_ * cfg_.in));
    gemm<T>(Trans::no, Trans::no, rows_, cfg_.in, local_out(), T{1}, dy.data(), local_out(),
            weight_.value.data(), cfg_.in, T{0}, dx_full.data(), cfg_.in);
    std::vector<T> dx(dx_full.size() / static_cast<std::size_t>(tp_->size()));
    tp_->reduce_scatter(detail::cspan(dx_full), std::span<T>(dx));
    return dx;
  }

  Param<T>& weight() noexcept { return weight_; }
  ParamList<T> parameters() { return {&weight_}; }

 private:
  LinearConfig cfg_;
  Comm* tp_;
  Param<T> weight_;
  std::vector<T> x_full_;
  std::int64_t rows_ = 0;
};

}  // namespace v0
}  // namespace moefold
