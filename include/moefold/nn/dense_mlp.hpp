#pragma once
/// \file
/// `DenseMlp`: the dense SwiGLU MLP block of a decoder layer (and the shape of a shared expert,
/// spec §2.8), tensor-parallel with SP over `tp`:
///
///   x [T, H] ──fc1 column-parallel (AG tp)──▶ [T·TP, 2·F/TP] = [gate | up]
///     → silu(gate) ⊙ up [T·TP, F/TP] ──fc2 row-parallel (RS tp)──▶ y [T, H]
///
/// fc1's global weight is `[2F, H]` = [gate rows; up rows]; rank t holds rows [t·F/TP, …) of
/// each half, stored gate then up (Megatron's per-rank shard). fc2 is `[H, F]`, split by columns.
/// The block has the `TokenBlock` interface (decoder_layer.hpp), the slot an MoE layer fills.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/row_parallel_linear.hpp"

namespace moefold {
inline namespace v0 {

struct DenseMlpConfig {
  std::string name = "mlp";  ///< parameter prefix, e.g. "layers.0.mlp"
  std::int64_t hidden = 0;   ///< hidden_size H
  std::int64_t ffn = 0;      ///< ffn_hidden_size F
  std::uint64_t seed = 0;
  double init_scale = 0.02;
};

/// SwiGLU MLP, TP + SP over `tp`.
template <class T, Communicator Comm>
class DenseMlp {
 public:
  using Config = DenseMlpConfig;

  /// Throws `invalid_config` when F is not divisible by TP.
  DenseMlp(Config cfg, Comm& tp)
      : cfg_(std::move(cfg)),
        fc1_(LinearConfig{.name = cfg_.name + ".linear_fc1.weight",
                          .in = cfg_.hidden,
                          .out = 2 * cfg_.ffn,
                          .parts = 2,
                          .seed = cfg_.seed,
                          .scale = cfg_.init_scale},
             tp),
        fc2_(LinearConfig{.name = cfg_.name + ".linear_fc2.weight",
                          .in = cfg_.ffn,
                          .out = cfg_.hidden,
                          .seed = cfg_.seed,
                          .scale = cfg_.init_scale},
             tp) {}
  /// The decoder layer's constructor form: takes `tp` from the groups.
  DenseMlp(Config cfg, ProcessGroups<Comm>& groups) : DenseMlp(std::move(cfg), groups.tp()) {}

  /// x: this rank's tokens [T, H] → y [T, H]. Collective over `tp`.
  /// The dense MLP keeps no per-step state: the context is accepted and unused.
  std::vector<T> forward(std::span<T const> x, ForwardContext const& /*ctx*/) { return forward(x); }
  std::vector<T> forward(std::span<T const> x) {
    h_ = fc1_.forward(x);  // [rows, 2n]: gate | up
    std::int64_t const n = fc2_.local_in();
    std::int64_t const rows = static_cast<std::int64_t>(h_.size()) / (2 * n);
    std::vector<T> act(static_cast<std::size_t>(rows * n));
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t i = 0; i < n; ++i) {
        T const g = h_[static_cast<std::size_t>(r * 2 * n + i)];
        T const u = h_[static_cast<std::size_t>(r * 2 * n + n + i)];
        act[static_cast<std::size_t>(r * n + i)] = g / (T{1} + std::exp(-g)) * u;
      }
    return fc2_.forward(detail::cspan(act));
  }

  /// dy [T, H] → dx [T, H]; accumulates fc1 and fc2 gradients. Collective over `tp`.
  std::vector<T> backward(std::span<T const> dy) {
    auto const dact = fc2_.backward(dy);
    std::int64_t const n = fc2_.local_in();
    std::int64_t const rows = static_cast<std::int64_t>(dact.size()) / n;
    std::vector<T> dh(h_.size());
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t i = 0; i < n; ++i) {
        auto const gi = static_cast<std::size_t>(r * 2 * n + i);
        auto const ui = gi + static_cast<std::size_t>(n);
        T const g = h_[gi], u = h_[ui], da = dact[static_cast<std::size_t>(r * n + i)];
        T const sig = T{1} / (T{1} + std::exp(-g));
        dh[gi] = da * u * sig * (T{1} + g * (T{1} - sig));
        dh[ui] = da * g * sig;
      }
    return fc1_.backward(detail::cspan(dh));
  }

  ColumnParallelLinear<T, Comm>& linear_fc1() noexcept { return fc1_; }
  RowParallelLinear<T, Comm>& linear_fc2() noexcept { return fc2_; }
  ParamList<T> parameters() { return {&fc1_.weight(), &fc2_.weight()}; }

 private:
  Config cfg_;
  ColumnParallelLinear<T, Comm> fc1_;
  RowParallelLinear<T, Comm> fc2_;
  std::vector<T> h_;
};

}  // namespace v0
}  // namespace moefold
