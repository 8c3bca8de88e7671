#pragma once
/// \file
/// `DecoderLayer`: one pre-norm transformer layer of a folded model,
///
///   h = x + Attention(RMSNorm(x))        attention layout: TP (+SP) over tp, CP over cp
///   y = h + Block(RMSNorm(h))            the MLP slot: DenseMlp, or an MoE layer
///
/// The attention → MLP boundary is a reshape, no communication: both sides see this rank's
/// tokens `[S/(CP·TP), B, H]` as `[T, H]`. The MLP slot is any `TokenBlock`: constructible from
/// (its Config, ProcessGroups&), with forward(x [T, H]) → y [T, H], backward(dy) → dx and
/// parameters(). An MoE layer with that interface uses its own (ETP × EP × EDP) groups inside.

#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/nn/attention.hpp"
#include "moefold/nn/dense_mlp.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/rms_norm.hpp"

namespace moefold {
inline namespace v0 {

/// A block that maps this rank's tokens [T, H] to [T, H] and back-propagates: the MLP slot of a
/// decoder layer. Its forward receives the `ForwardContext` (mode, micro-batch size B, …).
template <class B, class T>
concept TokenBlock = requires(B& b, std::span<T const> x, ForwardContext const& ctx) {
  typename B::Config;
  { b.forward(x, ctx) } -> std::convertible_to<std::vector<T>>;
  { b.backward(x) } -> std::convertible_to<std::vector<T>>;
  { b.parameters() } -> std::same_as<ParamList<T>>;
};

/// Sizes of a decoder layer; `mlp` is the MLP slot's own config.
template <class MlpConfig>
struct DecoderLayerConfig {
  std::string name = "layers.0";  ///< parameter prefix
  AttentionConfig attention;      ///< its name is set to "<name>.self_attention"
  MlpConfig mlp;                  ///< its name is set to "<name>.mlp"
  double norm_eps = 1e-5;
};

/// Pre-norm decoder layer: attention block, then the `Mlp` block, each with a residual.
template <class T, Communicator Comm, class Mlp = DenseMlp<T, Comm>>
requires TokenBlock<Mlp, T> && std::constructible_from < Mlp, typename Mlp::Config,
    ProcessGroups<Comm>
& > class DecoderLayer {
 public:
  using Config = DecoderLayerConfig<typename Mlp::Config>;

  /// Throws `invalid_config` for sizes the folding cannot split (see Attention, Mlp).
  DecoderLayer(Config cfg, ProcessGroups<Comm>& groups)
      : cfg_(std::move(cfg)),
        input_norm_(RMSNormConfig{.name = cfg_.name + ".input_layernorm.weight",
                                  .hidden = cfg_.attention.hidden,
                                  .eps = cfg_.norm_eps,
                                  .seed = cfg_.attention.seed}),
        attention_(named(cfg_.attention, cfg_.name + ".self_attention"), groups.tp(), groups.cp()),
        mlp_norm_(RMSNormConfig{.name = cfg_.name + ".pre_mlp_layernorm.weight",
                                .hidden = cfg_.attention.hidden,
                                .eps = cfg_.norm_eps,
                                .seed = cfg_.attention.seed}),
        mlp_(named(cfg_.mlp, cfg_.name + ".mlp"), groups) {}

  /// x: this rank's tokens [S/(CP·TP), B, H] → y, same shape; `ctx.batch` is B (required) and
  /// the whole context goes to the MLP slot. Collective over tp and cp (and whatever the MLP
  /// slot uses).
  std::vector<T> forward(std::span<T const> x, ForwardContext const& ctx) {
    MOEFOLD_EXPECTS(ctx.batch >= 1, "DecoderLayer::forward: ForwardContext::batch must be ≥ 1 "
                                    "(got {})",
                    ctx.batch);
    auto const a = attention_.forward(detail::cspan(input_norm_.forward(x)), ctx.batch);
    std::vector<T> h(x.begin(), x.end());
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += a[i];
    auto const m = mlp_.forward(detail::cspan(mlp_norm_.forward(detail::cspan(h))), ctx);
    for (std::size_t i = 0; i < h.size(); ++i) h[i] += m[i];
    return h;
  }
  /// A training forward of B = `batch` sequences outside a scheduled step.
  std::vector<T> forward(std::span<T const> x, std::int64_t batch) {
    return forward(x, ForwardContext{.batch = batch});
  }

  /// dy → dx, same shape; accumulates every parameter gradient.
  std::vector<T> backward(std::span<T const> dy) {
    std::vector<T> const mb = mlp_.backward(dy);
    auto const dm = mlp_norm_.backward(detail::cspan(mb));
    std::vector<T> dh(dy.begin(), dy.end());
    for (std::size_t i = 0; i < dh.size(); ++i) dh[i] += dm[i];
    auto const da = input_norm_.backward(detail::cspan(attention_.backward(detail::cspan(dh))));
    for (std::size_t i = 0; i < dh.size(); ++i) dh[i] += da[i];
    return dh;
  }

  Attention<T, Comm>& attention() noexcept { return attention_; }
  Mlp& mlp() noexcept { return mlp_; }
  ParamList<T> parameters() {
    ParamList<T> out = input_norm_.parameters();
    append(out, attention_.parameters());
    append(out, mlp_norm_.parameters());
    append(out, mlp_.parameters());
    return out;
  }

 private:
  template <class C>
  static C named(C c, std::string name) {
    c.name = std::move(name);
    return c;
  }

  Config cfg_;
  RMSNorm<T> input_norm_;
  Attention<T, Comm> attention_;
  RMSNorm<T> mlp_norm_;
  Mlp mlp_;
};

}  // namespace v0
}  // namespace moefold
