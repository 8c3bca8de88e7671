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
#include <ranges>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/attention.hpp"
#include "moefold/nn/dense_mlp.hpp"
#include "moefold/nn/detail/tensor.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/nn/rms_norm.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {

// clang-format off
namespace detail {
/// What a token block's forward/backward may return: a host vector or Buffer (anything that
/// converts to `std::vector<T>`), or another contiguous sized range of T.
template <class R, class T>
concept TokenResult = std::convertible_to<R, std::vector<T>> ||
                      (std::ranges::contiguous_range<R> && std::ranges::sized_range<R> &&
                       std::same_as<std::ranges::range_value_t<R>, T>);
/// A block whose forward(x, ctx) and backward(x) take tokens as `X` (a view or a span).
template <class B, class T, class X>
concept TokenBlockTaking = requires(B& b, X x, ForwardContext const& ctx) {
  { b.forward(x, ctx) } -> TokenResult<T>;
  { b.backward(x) } -> TokenResult<T>;
};
}  // namespace detail

/// A block that maps this rank's tokens [T, H] to [T, H] and back-propagates: the MLP slot of a
/// decoder layer. Its forward receives the `ForwardContext` (mode, micro-batch size B, …). The
/// tokens come as a host `View<T const>` or a `std::span<T const>`; the results are a Buffer,
/// a vector or another contiguous range of T.
template <class B, class T>
concept TokenBlock = requires(B& b) {
                       typename B::Config;
                       { b.parameters() } -> std::same_as<ParamList<T>>;
                     } && (detail::TokenBlockTaking<B, T, View<T const>> ||
                           detail::TokenBlockTaking<B, T, std::span<T const>>);

namespace detail {
/// A `TokenBlock` built from (its Config, groups) or (exec, its Config, groups).
template <class Mlp, class Exec, class T, class Comm>
concept MlpSlot = TokenBlock<Mlp, T> &&
                  (std::constructible_from<Mlp, typename Mlp::Config, ProcessGroups<Comm>&> ||
                   std::constructible_from<Mlp, Exec, typename Mlp::Config, ProcessGroups<Comm>&>);
}  // namespace detail
// clang-format on

/// Sizes of a decoder layer; `mlp` is the MLP slot's own config.
template <class MlpConfig>
struct DecoderLayerConfig {
  std::string name = "layers.0";  ///< parameter prefix
  AttentionConfig attention;      ///< its name is set to "<name>.self_attention"
  MlpConfig mlp;                  ///< its name is set to "<name>.mlp"
  double norm_eps = 1e-5;
};

/// Pre-norm decoder layer: attention block, then the `Mlp` block, each with a residual. The
/// `Mlp` is built from (exec, its Config, groups) when it takes an instance, else from (its
/// Config, groups).
template <ExecutionInstance Exec, class T, Communicator Comm, class Mlp = DenseMlp<Exec, T, Comm>>
requires detail::MlpSlot<Mlp, Exec, T, Comm>
class DecoderLayer {
 public:
  using Config = DecoderLayerConfig<typename Mlp::Config>;
  using Space = typename Exec::memory_space;

  /// Throws `invalid_config` for sizes the folding cannot split (see Attention, Mlp).
  DecoderLayer(Exec exec, Config cfg, ProcessGroups<Comm>& groups)
      : exec_(std::move(exec)),
        cfg_(std::move(cfg)),
        input_norm_(exec_, RMSNormConfig{.name = cfg_.name + ".input_layernorm.weight",
                                         .hidden = cfg_.attention.hidden,
                                         .eps = cfg_.norm_eps,
                                         .seed = cfg_.attention.seed}),
        attention_(exec_, named(cfg_.attention, cfg_.name + ".self_attention"), groups.tp(),
                   groups.cp()),
        mlp_norm_(exec_, RMSNormConfig{.name = cfg_.name + ".pre_mlp_layernorm.weight",
                                       .hidden = cfg_.attention.hidden,
                                       .eps = cfg_.norm_eps,
                                       .seed = cfg_.attention.seed}),
        mlp_(make_mlp(exec_, named(cfg_.mlp, cfg_.name + ".mlp"), groups)) {}
  DecoderLayer(Config cfg, ProcessGroups<Comm>& groups) requires std::default_initializable<Exec>
      : DecoderLayer(Exec{}, std::move(cfg), groups) {}

  /// x: this rank's tokens [S/(CP·TP), B, H] → y, same shape; `ctx.batch` is B (required) and
  /// the whole context goes to the MLP slot. Collective over tp and cp (and whatever the MLP
  /// slot uses).
  void forward(View<T const, Space> x, ForwardContext const& ctx, View<T, Space> y) {
    MOEFOLD_EXPECTS(ctx.batch >= 1,
                    "DecoderLayer::forward: ForwardContext::batch must be ≥ 1 "
                    "(got {})",
                    ctx.batch);
    MOEFOLD_EXPECTS(y.size() == x.size(), "DecoderLayer::forward: output of {} elements for {}",
                    y.size(), x.size());
    std::int64_t const n = x.size();
    auto const h = detail::flat(y);
    auto const xn = detail::reuse(exec_, attn_in_, n);
    input_norm_.forward(x, xn);
    auto const a = detail::reuse(exec_, attn_out_, n);
    attention_.forward(xn, ctx.batch, a);
    copy(exec_, detail::flat(x), h);  // h = x + a
    ops::add_into<Exec, T>(exec_, a, h);
    auto const hn = detail::reuse(exec_, mlp_in_, n);
    mlp_norm_.forward(h, hn);
    auto const m = mlp_.forward(tokens(hn), ctx);
    ops::add_into<Exec, T>(exec_, View<T const, Space>(m), h);  // y = h + m
  }
  Buffer<T, Space> forward(View<T const, Space> x, ForwardContext const& ctx) {
    return detail::allocated<T>(exec_, x.size(), [&](View<T, Space> y) { forward(x, ctx, y); });
  }
  /// A training forward of B = `batch` sequences outside a scheduled step.
  Buffer<T, Space> forward(View<T const, Space> x, std::int64_t batch) {
    return forward(x, ForwardContext{.batch = batch});
  }

  /// dy → dx, same shape; accumulates every parameter gradient.
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    std::int64_t const n = dy.size();
    MOEFOLD_EXPECTS(dx.size() == n, "DecoderLayer::backward: input gradient of {} elements for {}",
                    dx.size(), n);
    auto const dh = detail::flat(dx);
    auto const m = mlp_.backward(tokens(dy));
    auto const dm = detail::reuse(exec_, mlp_in_, n);
    mlp_norm_.backward(View<T const, Space>(m), dm);
    copy(exec_, detail::flat(dy), dh);  // dh = dy + dm
    ops::add_into<Exec, T>(exec_, dm, dh);
    auto const da = detail::reuse(exec_, attn_out_, n);
    attention_.backward(dh, da);
    auto const dn = detail::reuse(exec_, attn_in_, n);
    input_norm_.backward(da, dn);
    ops::add_into<Exec, T>(exec_, dn, dh);  // dx = dh + da
  }
  Buffer<T, Space> backward(View<T const, Space> dy) {
    return detail::allocated<T>(exec_, dy.size(), [&](View<T, Space> dx) { backward(dy, dx); });
  }

  Attention<Exec, T, Comm>& attention() noexcept { return attention_; }
  Mlp& mlp() noexcept { return mlp_; }

  /// Per-microbatch saved tensors of every sub-layer (nn/microbatch_stash.hpp); the layer's own
  /// buffers are temporaries. Needs an MLP slot that is a `StashingLayer`.
  void stash(int mb) requires StashingLayer<Mlp> {
    input_norm_.stash(mb);
    attention_.stash(mb);
    mlp_norm_.stash(mb);
    mlp_.stash(mb);
  }
  void restore(int mb) requires StashingLayer<Mlp> {
    input_norm_.restore(mb);
    attention_.restore(mb);
    mlp_norm_.restore(mb);
    mlp_.restore(mb);
  }
  void drop_stashed() requires StashingLayer<Mlp> {
    input_norm_.drop_stashed();
    attention_.drop_stashed();
    mlp_norm_.drop_stashed();
    mlp_.drop_stashed();
  }
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
  static Mlp make_mlp(Exec const& exec, typename Mlp::Config cfg, ProcessGroups<Comm>& groups) {
    if constexpr (std::constructible_from<Mlp, Exec, typename Mlp::Config, ProcessGroups<Comm>&>)
      return Mlp(exec, std::move(cfg), groups);
    else
      return Mlp(std::move(cfg), groups);
  }
  /// Tokens as the MLP slot takes them: a view, or a host span.
  static auto tokens(View<T const, Space> v) {
    if constexpr (detail::TokenBlockTaking<Mlp, T, View<T const>>)
      return v;
    else
      return std::span<T const>(v.data(), static_cast<std::size_t>(v.size()));
  }

  Exec exec_;
  Config cfg_;
  RmsNorm<Exec, T> input_norm_;
  Attention<Exec, T, Comm> attention_;
  RmsNorm<Exec, T> mlp_norm_;
  Mlp mlp_;
  // Per-step temporaries, reused across calls.
  Buffer<T, Space> attn_in_, attn_out_, mlp_in_;
};

namespace cpu {
template <class T, Communicator Comm, class Mlp = moefold::DenseMlp<Cpu, T, Comm>>
using DecoderLayer = moefold::DecoderLayer<Cpu, T, Comm, Mlp>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
