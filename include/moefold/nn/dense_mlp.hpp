#pragma once
/// \file
/// `DenseMlp`: the dense SwiGLU MLP block of a decoder layer (and the shape of a shared expert,
/// spec §2.8), tensor-parallel with SP over `tp`:
///
///   x [T, H] ──fc1 column-parallel (AG tp)──▶ [T·TP, 2·F/TP] = [gate | up]
///     → silu(gate) ⊙ up [T·TP, F/TP] (ops/activations.hpp's SwiGLU) ──fc2 row-parallel (RS tp)──▶
///     y [T, H]
///
/// fc1's global weight is `[2F, H]` = [gate rows; up rows]; rank t holds rows [t·F/TP, …) of
/// each half, stored gate then up (Megatron's per-rank shard). fc2 is `[H, F]`, split by columns.
/// The block has the `TokenBlock` interface (decoder_layer.hpp), the slot an MoE layer fills.

#include <concepts>
#include <cstdint>
#include <string>
#include <utility>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/nn/row_parallel_linear.hpp"
#include "moefold/ops/activations.hpp"

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
template <ExecutionInstance Exec, class T, Communicator Comm>
class DenseMlp {
 public:
  using Config = DenseMlpConfig;
  using Space = typename Exec::memory_space;

  /// Throws `invalid_config` when F is not divisible by TP.
  DenseMlp(Exec exec, Config cfg, Comm& tp)
      : exec_(std::move(exec)),
        cfg_(std::move(cfg)),
        fc1_(exec_,
             LinearConfig{.name = cfg_.name + ".linear_fc1.weight",
                          .in = cfg_.hidden,
                          .out = 2 * cfg_.ffn,
                          .parts = 2,
                          .seed = cfg_.seed,
                          .scale = cfg_.init_scale},
             tp),
        fc2_(exec_,
             LinearConfig{.name = cfg_.name + ".linear_fc2.weight",
                          .in = cfg_.ffn,
                          .out = cfg_.hidden,
                          .seed = cfg_.seed,
                          .scale = cfg_.init_scale},
             tp) {}
  DenseMlp(Config cfg, Comm& tp) requires std::default_initializable<Exec>
      : DenseMlp(Exec{}, std::move(cfg), tp) {}
  /// The decoder layer's constructor form: takes `tp` from the groups.
  DenseMlp(Exec exec, Config cfg, ProcessGroups<Comm>& groups)
      : DenseMlp(std::move(exec), std::move(cfg), groups.tp()) {}
  DenseMlp(Config cfg, ProcessGroups<Comm>& groups) requires std::default_initializable<Exec>
      : DenseMlp(Exec{}, std::move(cfg), groups.tp()) {}

  /// x: this rank's tokens [T, H] → y [T, H]. Collective over `tp`.
  /// The dense MLP keeps no per-step state: the context is accepted and unused.
  void forward(View<T const, Space> x, View<T, Space> y) {
    forward_fc1(x);
    forward_fc2(y);
  }
  /// `forward` in two halves, for work overlapped with other collectives (the MoE layer's
  /// shared-expert overlap): the SP all-gather, fc1 and the activation of x [T, H]; then fc2
  /// and its reduce-scatter into y [T, H]. Each collective over `tp`.
  void forward_fc1(View<T const, Space> x) {
    std::int64_t const n = fc2_.local_in();
    std::int64_t const rows =
        fc1_.out_rows(detail::rows_of(x, cfg_.hidden, "DenseMlp " + cfg_.name));
    fc1_.forward(x, detail::reuse(exec_, h_, rows * 2 * n));  // [rows, 2n]: gate | up
    auto const act = detail::reuse(exec_, act_, rows * n);
    ops::activation_forward<SwiGLU>(exec_, View<T const, Space>(h_.view(rows, 2 * n)),
                                    act.reshaped(rows, n));
  }
  void forward_fc2(View<T, Space> y) { fc2_.forward(View<T const, Space>(act_.view()), y); }
  Buffer<T, Space> forward(View<T const, Space> x) {
    return detail::allocated<T>(exec_, x.size(), [&](View<T, Space> y) { forward(x, y); });
  }
  Buffer<T, Space> forward(View<T const, Space> x, ForwardContext const& /*ctx*/) {
    return forward(x);
  }

  /// dy [T, H] → dx [T, H]; accumulates fc1 and fc2 gradients. Collective over `tp`.
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    std::int64_t const n = fc2_.local_in();
    std::int64_t const rows = static_cast<std::int64_t>(h_.size()) / (2 * n);
    auto const dact = detail::reuse(exec_, dact_, rows * n);
    fc2_.backward(dy, dact);
    auto const dh = detail::reuse(exec_, dh_, rows * 2 * n);
    ops::activation_backward<SwiGLU>(exec_, View<T const, Space>(h_.view(rows, 2 * n)),
                                     View<T const, Space>(dact.reshaped(rows, n)),
                                     dh.reshaped(rows, 2 * n));
    fc1_.backward(dh, dx);
  }
  Buffer<T, Space> backward(View<T const, Space> dy) {
    return detail::allocated<T>(exec_, dy.size(), [&](View<T, Space> dx) { backward(dy, dx); });
  }

  ColumnParallelLinear<Exec, T, Comm>& linear_fc1() noexcept { return fc1_; }
  RowParallelLinear<Exec, T, Comm>& linear_fc2() noexcept { return fc2_; }
  ParamList<T> parameters() { return {&fc1_.weight(), &fc2_.weight()}; }

  /// Per-microbatch saved tensors (nn/microbatch_stash.hpp).
  void stash(int mb) {
    stash_.stash(mb, std::tie(h_));
    fc1_.stash(mb);
    fc2_.stash(mb);
  }
  void restore(int mb) {
    stash_.restore(mb, std::tie(h_));
    fc1_.restore(mb);
    fc2_.restore(mb);
  }
  void drop_stashed() {
    stash_.drop();
    fc1_.drop_stashed();
    fc2_.drop_stashed();
  }

 private:
  Exec exec_;
  Config cfg_;
  ColumnParallelLinear<Exec, T, Comm> fc1_;
  RowParallelLinear<Exec, T, Comm> fc2_;
  Buffer<T, Space> h_, act_, dact_, dh_;
  MicrobatchStash stash_;
};

namespace cpu {
template <class T, Communicator Comm>
using DenseMlp = moefold::DenseMlp<Cpu, T, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
