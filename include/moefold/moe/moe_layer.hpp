#pragma once
/// \file
/// `MoELayer<Exec, Router, Dispatcher, Experts, Comm>`: the MoE block of a folded decoder layer,
/// composed from policies (DESIGN §4) and run on this rank's tokens straight from attention:
///
///   x [T, H] ─▶ router (local tokens; statistics over tp_cp / tp_dp_cp)
///            ─▶ dispatcher plan + dispatch (ep, etp, tp_ep)  ─▶ grouped-GEMM experts
///            ─▶ dispatcher combine (probabilities applied) ─▶ + shared expert (tp, SP) ─▶ y
///
///   using Layer = moefold::MoELayer<moefold::Cpu,
///                                   moefold::TopKRouter<moefold::Cpu, moefold::SoftmaxScore>,
///                                   moefold::AllToAllDispatcher<moefold::Dropless>,
///                                   moefold::GroupedGemmExperts<moefold::Cpu, moefold::SwiGLU>,
///                                   moefold::inproc::Communicator>;
///   Layer moe(cfg, groups);   // cfg: MoELayerConfig with Megatron's names
///   auto y = moe.forward(x, {.mode = ForwardMode::train, .batch = B, .microbatch = mb,
///                            .aux_loss_scale = aux_loss_gradient_scale(cp, M)});
///   auto dx = moe.backward(dy);
///
/// Per-step state (Megatron's semantics, forward_context.hpp): a `train` forward counts its
/// final routing (after dropping) for the expert bias and computes the auxiliary losses; a
/// `recompute` replays them; `eval` computes no auxiliary loss and changes nothing. The step
/// finalizer (train/finalize_model_grads.hpp) updates the expert bias and resets the state once
/// per global batch; `DecoderStage` passes the context and the aux-loss scale CP/M itself.
///
/// The routing probability is applied by the dispatcher's `combine` to each expert's output
/// row; with fc2 linear and without bias this equals Megatron's placement between the
/// activation and fc2 (spec §2.7), and it lets a deduplicated token be summed over its experts
/// before it travels back.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/process_groups.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/moe/all_gather_dispatcher.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/grouped_gemm_experts.hpp"
#include "moefold/moe/router.hpp"
#include "moefold/nn/dense_mlp.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/param.hpp"
#include "moefold/core/view.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/gate.hpp"
#include "moefold/ops/row_scale.hpp"

namespace moefold {
inline namespace v0 {

/// The MoE layer's configuration. Router and token-dropping choices are the `router` member's
/// fields, with Megatron's names (`router.num_experts`, `router.moe_router_topk`,
/// `router.moe_router_score_function`, `router.moe_aux_loss_coeff`, `router.moe_z_loss_coeff`,
/// `router.moe_expert_capacity_factor`, `router.moe_token_drop_policy`,
/// `router.moe_pad_expert_input_to_capacity`, `router.moe_router_num_groups`,
/// `router.moe_router_group_topk`, `router.moe_router_enable_expert_bias`, …).
struct MoELayerConfig {
  std::string name = "mlp";                           ///< parameter prefix, e.g. "layers.0.mlp"
  std::int64_t hidden_size = 0;                       ///< H
  std::int64_t moe_ffn_hidden_size = 0;               ///< F of each routed expert
  std::int64_t moe_shared_expert_intermediate_size = 0;  ///< F of the shared expert; 0: none
  /// Scale the shared expert's output by σ(x·g) with a learned g [1, H] (spec §2.8; g is
  /// replicated across tp under SP).
  bool moe_shared_expert_gate = false;
  /// Megatron's `moe_shared_expert_overlap`: the shared expert's fc1 and activation run while
  /// the dispatch's token all-to-all is in flight, its fc2 while the combine's is (spec §2.8
  /// "Overlap mode"); same results, bitwise. Needs the all-to-all dispatcher and a shared expert.
  bool moe_shared_expert_overlap = false;
  RouterConfig router{};                              ///< routing and token dropping
  /// A token crosses to each destination EP rank once and is expanded there (DeepEP-style);
  /// false: once per (token, expert), as Megatron. Ignored in drop-and-pad mode.
  bool moe_token_dispatcher_dedup = true;
  std::uint64_t seed = 1234;  ///< initialization seed (and the input jitter's)
  double init_std = 0.02;             ///< normal initialization of router and expert weights
};

namespace detail {
template <class R>
struct router_traits;
template <class Exec, class Score, class Real>
struct router_traits<TopKRouter<Exec, Score, Real>> {
  using real_type = Real;
};
/// The router's execution instance: its `exec_type`, or `Default` for a router without one.
template <class R, class Default>
struct router_exec {
  using type = Default;
};
template <class R, class Default>
  requires requires { typename R::exec_type; }
struct router_exec<R, Default> {
  using type = typename R::exec_type;
};

/// The drop policy object for tag `Drop` from the run-time config; a config that asks for
/// another kind of dropping than the type chosen is an error naming both.
template <class Drop>
Drop make_drop_policy(RouterConfig const& c) {
  if constexpr (std::is_same_v<Drop, Dropless>) {
    if (c.moe_expert_capacity_factor)
      throw invalid_config(fmt::format(
          "moe_expert_capacity_factor = {} asks for token dropping, but the dispatcher policy is "
          "Dropless",
          *c.moe_expert_capacity_factor));
    return Dropless{};
  } else {
    constexpr auto wanted =
        std::is_same_v<Drop, DropByProbs> ? TokenDropPolicy::probs : TokenDropPolicy::position;
    if (!c.moe_expert_capacity_factor)
      throw invalid_config("the dispatcher drops tokens but moe_expert_capacity_factor is unset");
    if (c.moe_token_drop_policy != wanted)
      throw invalid_config(fmt::format(
          "moe_token_drop_policy = {} does not match the dispatcher's drop policy ({})",
          c.moe_token_drop_policy == TokenDropPolicy::probs ? "probs" : "position",
          wanted == TokenDropPolicy::probs ? "probs" : "position"));
    return Drop{.capacity_factor = *c.moe_expert_capacity_factor,
                .pad_to_capacity = c.moe_pad_expert_input_to_capacity};
  }
}
}  // namespace detail

/// A router policy: a `TopKRouter<Exec, Score, Real>`.
template <class R>
concept MoERouterPolicy = requires { typename detail::router_traits<R>::real_type; };

/// A dispatcher policy tag (`AllToAllDispatcher<Drop>`, `AllGatherDispatcher<Drop>`) whose
/// dispatcher for (Exec, Comm, Real) models `TokenDispatcher`.
template <class D, class Exec, class Comm, class Real>
concept MoEDispatcherPolicy = requires { typename D::drop_policy; } &&
                              TokenDispatcher<typename D::template dispatcher<Exec, Comm, Real>>;

/// An experts policy: grouped experts over `value_type` rows of its `exec_type`'s memory,
/// built from (Exec, ExpertsConfig, seed); `forward(x, counts)` computes f_e(x) without
/// probabilities.
template <class E>
concept MoEExpertsPolicy =
    requires(E& e, View<typename E::value_type const, typename E::exec_type::memory_space> x,
             std::span<std::int64_t const> counts) {
      typename E::value_type;
      typename E::exec_type;
      { e.forward(x, counts) } -> std::same_as<
          Buffer<typename E::value_type, typename E::exec_type::memory_space>>;
      e.backward(x);
      { e.parameters() } -> std::same_as<ParamList<typename E::value_type>>;
    } && std::constructible_from<E, typename E::exec_type, ExpertsConfig, std::uint64_t>;

/// The router computes in `compute_t` of the experts' type (the same type for float and double
/// layers, FP32 for bf16 layers) or in double; `router.moe_router_dtype` (Megatron's
/// `--moe-router-dtype`) names that type: unset means the input dtype (the router's type must
/// then be `compute_t`; a bf16 layer's router rounds its logits to bf16), fp32 and fp64 need a
/// router of float and double. A router of another type than the layer's keeps its weight as
/// a parameter of the layer's type (FP32 main gradient under bf16) and gets widened copies of
/// it and of the tokens; the probabilities reach the dispatcher rounded to the layer's type.
template <ExecutionInstance Exec, MoERouterPolicy Router, class Dispatcher, MoEExpertsPolicy Experts,
          Communicator Comm>
  requires(std::same_as<typename detail::router_traits<Router>::real_type,
                        compute_t<typename Experts::value_type>> ||
           std::same_as<typename detail::router_traits<Router>::real_type, double>) &&
           std::same_as<typename Experts::exec_type, Exec> &&
           std::same_as<typename detail::router_exec<Router, Exec>::type, Exec> &&
           MoEDispatcherPolicy<Dispatcher, Exec, Comm, typename Experts::value_type> &&
           HostInstance<Exec>
class MoELayer {
 public:
  using T = typename Experts::value_type;
  using Space = typename Exec::memory_space;
  /// The router's computation type (`compute_t<T>` or double).
  using RouterReal = typename detail::router_traits<Router>::real_type;
  static constexpr bool kWideRouter = !std::same_as<RouterReal, T>;
  using Config = MoELayerConfig;
  using DispatcherType = typename Dispatcher::template dispatcher<Exec, Comm, T>;
  /// Whether the dispatcher runs work while its all-to-all is in flight (all-to-all only).
  static constexpr bool kOverlaps = requires { requires DispatcherType::overlaps_work; };

  /// Builds the router, dispatcher, experts (this rank's E/EP experts, ETP shard) and the
  /// optional shared expert. Throws `invalid_config` naming the rule, e.g. num_experts not
  /// divisible by EP, moe_ffn_hidden_size not divisible by ETP, a capacity factor with a
  /// Dropless dispatcher.
  MoELayer(Config cfg, ProcessGroups<Comm>& groups)
    requires std::default_initializable<Exec>
      : MoELayer(Exec{}, std::move(cfg), groups) {}
  MoELayer(Exec exec, Config cfg, ProcessGroups<Comm>& groups)
      : exec_(std::move(exec)),
        cfg_(std::move(cfg)),
        groups_(&groups),
        router_(exec_, checked(cfg_, groups).router, cfg_.hidden_size,
                cfg_.name + ".router.weight", cfg_.seed),
        dispatcher_(exec_,
                    DispatcherConfig{.num_experts = cfg_.router.num_experts,
                                     .moe_router_topk = cfg_.router.moe_router_topk,
                                     .hidden_size = cfg_.hidden_size,
                                     .dedup = cfg_.moe_token_dispatcher_dedup},
                    detail::make_drop_policy<typename Dispatcher::drop_policy>(cfg_.router),
                    groups),
        experts_(exec_,
                 ExpertsConfig{.num_local_experts = cfg_.router.num_experts / groups.ep().size(),
                               .first_expert = groups.ep().rank() *
                                               (cfg_.router.num_experts / groups.ep().size()),
                               .hidden_size = cfg_.hidden_size,
                               .ffn_hidden_size = cfg_.moe_ffn_hidden_size,
                               .etp_size = groups.etp().size(),
                               .etp_rank = groups.etp().rank(),
                               .name_prefix = cfg_.name + ".experts",
                               .init_std = cfg_.init_std},
                 cfg_.seed) {
    check_router_dtype();
    router_.weight_param().init(cfg_.seed, InitDist::normal, cfg_.init_std);
    if constexpr (kWideRouter) {  // the parameter: the same name, shape and initial values
      auto const& w = router_.weight_param();
      router_weight_ = Param<T>(w.name, w.cls, w.global_rows, w.global_cols, w.blocks);
      router_weight_.init(cfg_.seed, InitDist::normal, cfg_.init_std);
    }
    if (cfg_.moe_shared_expert_gate && cfg_.moe_shared_expert_intermediate_size <= 0)
      throw invalid_config("moe_shared_expert_gate needs moe_shared_expert_intermediate_size > 0");
    if (cfg_.moe_shared_expert_overlap) {
      if (!kOverlaps)
        throw invalid_config(
            "moe_shared_expert_overlap needs the all-to-all token dispatcher (Megatron: "
            "moe_token_dispatcher_type alltoall or flex); this layer's dispatcher is all-gather");
      if (cfg_.moe_shared_expert_intermediate_size <= 0)
        throw invalid_config(fmt::format(
            "moe_shared_expert_overlap needs a shared expert (moe_shared_expert_intermediate_size "
            "> 0, got {})",
            cfg_.moe_shared_expert_intermediate_size));
    }
    if (cfg_.moe_shared_expert_gate) {
      gate_weight_.emplace(Param<T>::whole(cfg_.name + ".shared_experts.gate_weight",
                                           ParamClass::tp_replicated, 1, cfg_.hidden_size));
      gate_weight_->init(cfg_.seed, InitDist::normal, cfg_.init_std);
    }
    if (cfg_.moe_shared_expert_intermediate_size > 0)
      shared_.emplace(exec_, DenseMlpConfig{.name = cfg_.name + ".shared_experts",
                                     .hidden = cfg_.hidden_size,
                                     .ffn = cfg_.moe_shared_expert_intermediate_size,
                                     .seed = cfg_.seed},
                      groups);
  }

  Config const& config() const noexcept { return cfg_; }

  /// x: this rank's tokens [T, H] (the attention side's SP-local shard, token t = s·B + b) →
  /// y [T, H]. `ctx` says what the forward is part of (train, recompute, eval), B and the
  /// auxiliary losses' gradient weight for the following backward. Collective over tp_cp and
  /// tp_dp_cp (router statistics of a train forward, when enabled), ep, etp, tp_ep and tp (shared
  /// expert): every rank of those groups must call it.
  Buffer<T, Space> forward(View<T const, Space> x, ForwardContext const& ctx = {}) {
    auto y = exec_.template allocate<T>(x.size());
    forward(x, y.view(), ctx);
    return y;
  }
  /// As the returning `forward`, into y [T, H].
  void forward(View<T const, Space> x, View<T, Space> y, ForwardContext const& ctx = {}) {
    MOEFOLD_EXPECTS(x.size() % cfg_.hidden_size == 0,
                    "MoELayer::forward: {} values are not whole rows of hidden size {}", x.size(),
                    cfg_.hidden_size);
    MOEFOLD_EXPECTS(y.size() == x.size() && x.contiguous() && y.contiguous(),
                    "MoELayer::forward: output of {} for input of {} (contiguous views)", y.size(),
                    x.size());
    std::int64_t const tokens = x.size() / cfg_.hidden_size;
    RouterGroups<Comm> const rg{.tp_cp = &groups_->tp_cp(), .tp_dp_cp = &groups_->tp_dp_cp()};
    if constexpr (kWideRouter) {
      ops::convert<Exec, T, RouterReal>(exec_, View<T const, Space>(router_weight_.value),
                                        router_.weight_param().value.view());
      resize(router_x_, x.size());
      ops::convert<Exec, T, RouterReal>(exec_, x, router_x_.view());
      router_.forward(View<RouterReal const, Space>(router_x_.view()), tokens, rg, ctx, routed_);
    } else {
      router_.forward(x, tokens, rg, ctx, routed_);
    }
    aux_loss_ = routed_.z_loss;
    for (auto const& a : routed_.aux_losses) aux_loss_ += a.value;
    aux_loss_scale_ = ctx.aux_loss_scale;
    auto const& routing = dispatcher_routing();
    auto const& meta = dispatcher_.plan(routing);
    if (ctx.mode == ForwardMode::train) router_.count_routed(meta.local_tokens_per_expert);
    // Shared-expert overlap: fc1 and the activation while the token all-to-all is in flight,
    // fc2 while the combine's is; otherwise the whole shared expert after combine (the same
    // operations on the same values: the results are bitwise equal).
    bool const overlap = shared_ && cfg_.moe_shared_expert_overlap;
    auto in = [&] {
      if constexpr (kOverlaps)
        if (overlap)
          return dispatcher_.dispatch(x, routing.probs.view(), [&] { shared_->forward_fc1(x); });
      return dispatcher_.dispatch(x, routing.probs.view());
    }();
    // Probabilities are applied in combine: the experts compute f_e(x).
    auto expert_out = experts_.forward(in.expert_input.view(),
                                       std::span<std::int64_t const>(in.tokens_per_local_expert));
    auto shared_fc2 = [&] {
      auto out = exec_.template allocate<T>(x.size());
      shared_->forward_fc2(out.view());
      shared_out_ = std::move(out);
    };
    // The all-to-all dispatcher keeps the expert output itself (no copy) and takes its large
    // buffers back: the experts keep their own copy of the input.
    auto combined = [&] {
      if constexpr (kOverlaps) {
        if (overlap) return dispatcher_.combine_owned(std::move(expert_out), shared_fc2);
        return dispatcher_.combine_owned(std::move(expert_out));
      } else {
        return dispatcher_.combine(expert_out.view());
      }
    }();
    copy<T>(exec_, combined.view(), y.reshaped(1, y.size()));
    if constexpr (kOverlaps) {
      dispatcher_.give_back(std::move(in.expert_input));
      dispatcher_.give_back(std::move(combined));
    }
    if (shared_) {
      if (!overlap) {
        shared_->forward_fc1(x);
        shared_fc2();
      }
      View<T const, Space> const s(shared_out_);
      if (gate_weight_) {
        resize(x_, x.size());
        copy<T>(exec_, x.reshaped(1, x.size()), x_.view());
        resize(gate_, tokens);
        ops::row_gate<Exec, T>(exec_, x.reshaped(tokens, cfg_.hidden_size), gate_weight_->value.view(),
                               gate_.view());
        ops::add_scaled_rows<Exec, T>(exec_, s.reshaped(tokens, cfg_.hidden_size), gate_.view(), y);
      } else {
        ops::add_into<Exec, T>(exec_, s, y);
      }
    }
  }

  /// dy [T, H] → dx [T, H]; accumulates the router, expert and shared-expert gradients (the
  /// auxiliary losses enter with weight `aux_loss_scale()`). Collective like `forward`.
  Buffer<T, Space> backward(View<T const, Space> dy) {
    auto dx = exec_.template allocate<T>(dy.size());
    backward(dy, dx.view());
    return dx;
  }
  /// As the returning `backward`, into dx [T, H].
  void backward(View<T const, Space> dy, View<T, Space> dx) {
    auto const cg = dispatcher_.combine_backward(dy);
    auto const eg = experts_.backward(cg.d_expert_output.view());
    auto dg = dispatcher_.dispatch_backward(eg.input.view(), cg.d_expert_probs.view());
    MOEFOLD_EXPECTS(dx.size() == static_cast<std::int64_t>(dg.d_hidden.size()),
                    "MoELayer::backward: dx of {} for {} gradient values", dx.size(),
                    dg.d_hidden.size());
    copy<T>(exec_, dg.d_hidden.view(), dx.reshaped(1, dx.size()));
    if constexpr (kWideRouter) {
      // FP32 probability gradients into the router; its FP32 weight gradient joins the main
      // gradient of the bf16 parameter; its input gradient is rounded once.
      resize(router_dp_, static_cast<std::int64_t>(dg.d_probs.size()));
      ops::convert<Exec, T, RouterReal>(exec_, View<T const, Space>(dg.d_probs),
                                        router_dp_.view());
      auto const dr = router_.backward(View<RouterReal const, Space>(router_dp_.view()),
                                       aux_loss_scale_);
      auto& rw = router_.weight_param();
      if constexpr (std::same_as<grad_t<RouterReal>, grad_t<T>>) {
        ops::add_into<Exec, grad_t<T>>(exec_, View<grad_t<T> const, Space>(rw.grad),
                                       View<grad_t<T>, Space>(router_weight_.grad));
      } else {  // an FP64 router's gradient joins the layer's main gradient rounded once
        resize(router_dw_, static_cast<std::int64_t>(rw.grad.size()));
        ops::convert<Exec, grad_t<RouterReal>, grad_t<T>>(
            exec_, View<grad_t<RouterReal> const, Space>(rw.grad), router_dw_.view());
        ops::add_into<Exec, grad_t<T>>(exec_, View<grad_t<T> const, Space>(router_dw_.view()),
                                       View<grad_t<T>, Space>(router_weight_.grad));
      }
      ops::fill(exec_, View<RouterReal, Space>(rw.grad), RouterReal(0));
      resize(router_dx_, dx.size());
      ops::convert<Exec, RouterReal, T>(exec_, View<RouterReal const, Space>(dr), router_dx_.view());
      ops::add_into<Exec, T>(exec_, View<T const, Space>(router_dx_.view()), dx);
    } else {
      auto const dr = router_.backward(std::span<T const>(dg.d_probs), aux_loss_scale_);
      ops::add_into<Exec, T>(exec_, View<T const, Space>(dr), dx);
    }
    if (shared_) {
      View<T const, Space> d_shared = dy;
      if (gate_weight_) {
        // y += s · σ(z), z = x·g: ds = dy·σ; dz = (dy·s)·σ(1−σ); dx += dz·g; dg += Σ dz·x.
        std::int64_t const h = cfg_.hidden_size, tokens = static_cast<std::int64_t>(gate_.size());
        resize(d_shared_, dy.size());
        resize(dz_, tokens);
        ops::row_gate_backward<Exec, T>(exec_, dy, View<T const, Space>(shared_out_), gate_.view(),
                                        gate_weight_->value.view(), d_shared_.view(), dz_.view(), dx);
        ops::row_gate_weight_grad<Exec, T>(exec_, dz_.view(), x_.view(tokens, h),
                                           gate_weight_->grad.view());
        d_shared = d_shared_.view();
      }
      auto const ds = shared_->backward(std::span<T const>(d_shared));
      ops::add_into<Exec, T>(exec_, View<T const, Space>(ds), dx);
    }
  }

  /// Router weight, then the experts' weights, then the shared expert's.
  ParamList<T> parameters() {
    ParamList<T> out;
    if constexpr (kWideRouter)
      out.push_back(&router_weight_);
    else
      out.push_back(&router_.weight_param());
    append(out, experts_.parameters());
    if (shared_) append(out, shared_->parameters());
    if (gate_weight_) out.push_back(&*gate_weight_);
    return out;
  }

  /// The auxiliary losses (load balancing and z-loss) of the last forward, as this rank
  /// computed them (coefficients applied; 0 after an eval forward).
  double aux_loss() const noexcept { return aux_loss_; }
  /// The weight of the auxiliary losses' gradients in `backward`: the last forward's
  /// `ForwardContext::aux_loss_scale`. Megatron's value is `CP / num_microbatches`
  /// (`aux_loss_gradient_scale`), 1 with `calculate_per_token_loss`; `DecoderStage` sets it.
  double aux_loss_scale() const noexcept { return aux_loss_scale_; }

  /// The router's expert-bias counters of this step `[E]` (empty unless
  /// `moe_router_enable_expert_bias`); the step finalizer all-reduces them over tp_dp_cp in place.
  std::span<std::int64_t> expert_bias_counts() noexcept {
    return router_.local_tokens_per_expert();
  }
  /// The aux-loss-free expert-bias update from the reduced counters (no-op unless enabled).
  void apply_expert_bias_update() {
    if (cfg_.router.moe_router_enable_expert_bias) router_.apply_expert_bias_update();
  }
  /// Ends a step: the global aux loss's running counts and the microbatches' statistics kept for
  /// recomputation are reset.
  void reset_step_state() { router_.reset_step_state(); }

  /// Per-microbatch saved state of the router, dispatcher, experts and shared expert
  /// (nn/microbatch_stash.hpp).
  void stash(int mb)
    requires StashingLayer<Router> && StashingLayer<DispatcherType> &&
             StashingLayer<Experts>
  {
    stash_.stash(mb, saved());
    router_.stash(mb);
    dispatcher_.stash(mb);
    experts_.stash(mb);
    if (shared_) shared_->stash(mb);
  }
  void restore(int mb)
    requires StashingLayer<Router> && StashingLayer<DispatcherType> &&
             StashingLayer<Experts>
  {
    stash_.restore(mb, saved());
    router_.restore(mb);
    dispatcher_.restore(mb);
    experts_.restore(mb);
    if (shared_) shared_->restore(mb);
  }
  void drop_stashed()
    requires StashingLayer<Router> && StashingLayer<DispatcherType> &&
             StashingLayer<Experts>
  {
    stash_.drop();
    router_.drop_stashed();
    dispatcher_.drop_stashed();
    experts_.drop_stashed();
    if (shared_) shared_->drop_stashed();
  }

  /// The last plan's dispatcher metadata (splits, tokens per local expert, bytes sent).
  DispatchMetadata const& dispatch_metadata() const noexcept { return dispatcher_.metadata(); }
  Router& router() noexcept { return router_; }
  Experts& experts() noexcept { return experts_; }

 private:
  /// What backward reads of the forward (besides the sub-layers' own).
  auto saved() { return std::tie(shared_out_, gate_, x_, aux_loss_scale_); }

  /// A reusable buffer of n elements (reallocated only when the size changes).
  template <class U>
  void resize(Buffer<U, Space>& b, std::int64_t n) {
    if (static_cast<std::int64_t>(b.size()) != n) b = exec_.template allocate<U>(n);
  }

  /// The router's routing in the layer's type: itself, or (FP32 router of a bf16 layer) a copy
  /// with the probabilities rounded to bf16.
  Routing<T, Space> const& dispatcher_routing() {
    if constexpr (kWideRouter) {
      auto const& r = routed_.routing;
      routing_.num_tokens = r.num_tokens;
      routing_.num_experts = r.num_experts;
      resize(routing_.map, static_cast<std::int64_t>(r.map.size()));
      copy<Route>(exec_, r.map.view(), routing_.map.view());
      resize(routing_.probs, static_cast<std::int64_t>(r.probs.size()));
      ops::convert<Exec, RouterReal, T>(exec_, r.probs.view(), routing_.probs.view());
      resize(routing_.non_finite, static_cast<std::int64_t>(r.non_finite.size()));
      copy<std::int64_t>(exec_, r.non_finite.view(), routing_.non_finite.view());
      return routing_;
    } else {
      return routed_.routing;
    }
  }

  /// `moe_router_dtype` against the router's type (fp32 and fp64 are checked by the router):
  /// unset means the input dtype, i.e. a router of `compute_t<T>`, storing bf16 logits for a
  /// bf16 layer.
  void check_router_dtype() {
    if (cfg_.router.moe_router_dtype) return;
    if constexpr (!std::same_as<RouterReal, compute_t<T>>)
      throw invalid_config(fmt::format(
          "moe_router_dtype is unset (the input dtype, {}) but the router computes in {}: set "
          "moe_router_dtype = fp64 for a router of double",
          name(dtype_of<T>()), name(dtype_of<RouterReal>())));
    else if constexpr (std::same_as<T, bf16>)
      router_.round_logits_to_bf16(true);
  }

  /// Checks the folding-dependent rules before any member is built.
  static Config const& checked(Config const& c, ProcessGroups<Comm>& g) {
    if (c.hidden_size < 1)
      throw invalid_config(fmt::format("MoELayer: hidden_size must be ≥ 1 (got {})", c.hidden_size));
    if (c.router.num_experts % g.ep().size() != 0)
      throw invalid_config(fmt::format("num_experts ({}) is not divisible by "
                                       "expert_model_parallel_size ({})",
                                       c.router.num_experts, g.ep().size()));
    if (c.moe_ffn_hidden_size % g.etp().size() != 0)
      throw invalid_config(fmt::format("moe_ffn_hidden_size ({}) is not divisible by "
                                       "expert_tensor_parallel_size ({})",
                                       c.moe_ffn_hidden_size, g.etp().size()));
    return c;
  }

  Exec exec_;
  Config cfg_;
  ProcessGroups<Comm>* groups_;
  Router router_;
  DispatcherType dispatcher_;
  Experts experts_;
  std::optional<DenseMlp<Exec, T, Comm>> shared_;
  std::optional<Param<T>> gate_weight_;          // shared-expert gate g [1, H]
  std::vector<T> shared_out_;                    // saved for backward
  RouterOutput<RouterReal, Space> routed_;       // the router's output, reused across steps
  // bf16 layers (kWideRouter): the router weight parameter, the routing handed to the
  // dispatcher, and the router's FP32 inputs and gradients.
  Param<T> router_weight_;
  Routing<T, Space> routing_;
  Buffer<RouterReal, Space> router_x_, router_dp_;
  Buffer<grad_t<T>, Space> router_dw_;          // an FP64 router's weight gradient, rounded
  Buffer<T, Space> router_dx_;
  Buffer<T, Space> gate_, x_;                    // saved for backward
  Buffer<T, Space> d_shared_, dz_;               // backward's temporaries
  double aux_loss_ = 0;
  double aux_loss_scale_ = 1.0;
  MicrobatchStash stash_;
};

/// The default MoE block for a decoder layer's MLP slot on instance `Exec`: softmax top-k
/// router (in FP32 for bf16 layers), dropless all-to-all dispatcher, SwiGLU grouped-GEMM
/// experts (BLAS on the CPU).
template <ExecutionInstance Exec, class T, Communicator Comm>
using DefaultMoELayer =
    MoELayer<Exec, TopKRouter<Exec, SoftmaxScore, compute_t<T>>, AllToAllDispatcher<Dropless>,
             GroupedGemmExperts<Exec, SwiGLU, BlasGroupedGemm, T>, Comm>;

namespace cpu {
template <class T, Communicator Comm>
using DefaultMoELayer = moefold::DefaultMoELayer<Cpu, T, Comm>;
template <MoERouterPolicy Router, class Dispatcher, class Experts, Communicator Comm>
using MoELayer = moefold::MoELayer<Cpu, Router, Dispatcher, Experts, Comm>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
