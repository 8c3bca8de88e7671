#pragma once
/// \file
/// `TopKRouter<Exec, Score, Real>`: Megatron's router (spec §2.2) — gating logits from a weight
/// `[E, H]`, score function and (group-limited) top-k, expert bias for aux-loss-free balancing,
/// load-balancing losses and z-loss, forward and backward. Written once against an execution
/// instance: the per-token arithmetic runs as bodies of the ops tier (ops/router.hpp,
/// ops/aux_loss.hpp), the GEMMs through `gemm(exec_, …)`; statistics, counts and collectives
/// stay host metadata. Token dropping is a dispatcher policy
/// (capacity.hpp): it is decided per source rank on the routing this router returns.
///
///   moefold::TopKRouter<moefold::Cpu, moefold::SoftmaxScore> router(cfg, hidden);
///   auto out = router.forward(x, tokens, {.tp_cp = &groups.tp_cp()},
///                             {.mode = ForwardMode::train, .batch = B, .microbatch = mb});
///   auto dx = router.backward(d_probs);                                  // + router.weight_grad()

#include <fmt/format.h>
#include <algorithm>
#include <concepts>
#include <cstdint>
#include <map>
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
#include "moefold/moe/aux_losses.hpp"
#include "moefold/moe/input_jitter.hpp"
#include "moefold/moe/router_config.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/moe/score_functions.hpp"
#include "moefold/moe/sinkhorn.hpp"
#include "moefold/moe/top_k.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/aux_loss.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/router.hpp"

namespace moefold {
inline namespace v0 {

/// The groups the router's statistics are reduced over; a null pointer stands for a group of
/// one rank. `tp_cp` serves `aux_loss`, `seq_aux_loss` and the z-loss scale; `tp_dp_cp` serves
/// `global_aux_loss` and the expert-bias update.
template <Communicator Comm>
struct RouterGroups {
  Comm* tp_cp = nullptr;
  Comm* tp_dp_cp = nullptr;
};

/// A load-balancing loss's value on this rank.
struct AuxLossValue {
  LoadBalancingType type = LoadBalancingType::none;
  double value = 0;
};

/// What the router returns for T local tokens (the routing in the router's memory space).
template <class Real, MemorySpace Space = HostSpace>
struct RouterOutput {
  Routing<Real, Space> routing;          ///< K routed entries per token, probs (scaled)
  std::vector<AuxLossValue> aux_losses;  ///< one per enabled type with a non-zero coefficient
  double z_loss = 0;                     ///< 0 when no z-loss coefficient is set
};

/// The top-k router on execution instance `Exec`. Holds its weight `[E, H]`, the weight's
/// gradient, the expert bias, the expert-bias counters and the per-step statistics of the
/// auxiliary losses. One forward is followed by at most one backward.
///
/// Per-step state follows `ForwardContext` (Megatron's semantics, spec §2.2): a `train` forward
/// reduces and keeps its statistics (per microbatch, for a later `recompute`) and advances the
/// global aux loss's running sums; a `recompute` replays them without a collective; an `eval`
/// forward computes no auxiliary loss and changes nothing. Expert-bias counts are added by
/// `count_routed`, from the routing after token dropping (the MoE layer calls it on `train`
/// forwards). `reset_step_state` (the step finalizer) ends a step.
///
/// The routing it returns lives in the instance's memory; the dispatchers build their row maps
/// from it there. A host instance checks the logits for NaN and infinities at once; a device
/// instance leaves the per-token check in `Routing::non_finite` for the dispatcher's one copy
/// of counts to the host.
template <ExecutionInstance Exec, RouterScore Score, class Real = float>
class TopKRouter {
 public:
  using exec_type = Exec;
  using memory_space = typename Exec::memory_space;
  using value_type = Real;

  /// Throws `invalid_config` when `cfg` breaks a rule or names another score function.
  /// `weight_name` names the weight parameter (e.g. "layers.0.mlp.router.weight"); `seed` keys
  /// the input jitter's noise (with the step, the weight's name, the token and the feature).
  TopKRouter(Exec exec, RouterConfig cfg, std::int64_t hidden_size,
             std::string weight_name = "router.weight", std::uint64_t seed = 0)
      : exec_(std::move(exec)), cfg_(std::move(cfg)), hidden_(hidden_size), seed_(seed) {
    cfg_.validate();
    if (!Score::accepts(cfg_.moe_router_score_function))
      throw invalid_config(fmt::format(
          "moe_router_score_function = {} is not a variant of the router's score policy",
          name(cfg_.moe_router_score_function)));
    if (hidden_size < 1) throw invalid_config(fmt::format("hidden size {} < 1", hidden_size));
    if (cfg_.moe_router_dtype) {
      bool const match = *cfg_.moe_router_dtype == RouterDtype::fp32 ? std::is_same_v<Real, float>
                                                                     : std::is_same_v<Real, double>;
      if (!match)
        throw invalid_config(fmt::format(
            "moe_router_dtype = {0} needs a router computing in {1} (TopKRouter<Exec, Score, "
            "{1}>); this router computes in {2}",
            name(*cfg_.moe_router_dtype),
            *cfg_.moe_router_dtype == RouterDtype::fp32 ? "float" : "double",
            name(dtype_of<Real>())));
    }
    rule_ = router_rule(cfg_);
    auto const e = static_cast<std::size_t>(cfg_.num_experts);
    // Replicated across TP under sequence parallelism: its gradient is also summed over tp.
    weight_ = Param<Real, memory_space>::whole(std::move(weight_name), ParamClass::tp_replicated,
                                               cfg_.num_experts, hidden_size);
    layer_key_ = detail::hash_name(weight_.name);
    if (cfg_.moe_router_enable_expert_bias) {
      expert_bias_ = exec_.template allocate<Real>(cfg_.num_experts);
      local_tokens_per_expert_.assign(e, 0);
    }
    global_counts_.assign(e, 0.0);
  }
  TopKRouter(RouterConfig cfg, std::int64_t hidden_size, std::string weight_name = "router.weight",
             std::uint64_t seed = 0) requires std::default_initializable<Exec>
      : TopKRouter(Exec{}, std::move(cfg), hidden_size, std::move(weight_name), seed) {}

  Exec const& exec() const noexcept { return exec_; }
  /// Stores the logits, and their gradients in backward, rounded to bf16 after each GEMM: the
  /// router of a bf16 layer with `moe_router_dtype` unset (Megatron: logits in the input dtype;
  /// score functions and losses then run in `Real` on the rounded logits). Off by default.
  void round_logits_to_bf16(bool on) noexcept { bf16_logits_ = on; }
  bool rounds_logits_to_bf16() const noexcept { return bf16_logits_; }
  RouterConfig const& config() const noexcept { return cfg_; }
  std::int64_t hidden_size() const noexcept { return hidden_; }
  /// The weight `[E, H]` (Megatron's layout).
  View<Real, memory_space> weight() noexcept { return weight_.value.view(); }
  View<Real const, memory_space> weight() const noexcept { return weight_.value.view(); }
  /// The weight as a parameter (value and gradient), for gradient reduction and checkpoints.
  Param<Real, memory_space>& weight_param() noexcept { return weight_; }
  /// The weight's gradient, accumulated by `backward`.
  View<Real, memory_space> weight_grad() noexcept { return weight_.grad.view(); }
  /// The expert bias `[E]` (empty unless `moe_router_enable_expert_bias`).
  View<Real, memory_space> expert_bias() noexcept { return expert_bias_.view(); }
  /// Routed tokens per expert since the last bias update `[E]` (empty unless
  /// `moe_router_enable_expert_bias`; host metadata). The step finalizer all-reduces them in
  /// place.
  std::span<std::int64_t> local_tokens_per_expert() noexcept { return local_tokens_per_expert_; }
  std::span<std::int64_t const> local_tokens_per_expert() const noexcept {
    return local_tokens_per_expert_;
  }

  /// Per-microbatch saved state (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

  /// Routes the `tokens` local tokens `x [T, H]` (token `t = s·B + b`, B = `ctx.batch`).
  /// On a `train` forward, collective over `groups.tp_cp` when an aux/seq-aux loss is enabled
  /// and over `groups.tp_dp_cp` when the global aux loss is: every rank of those groups must
  /// call it; `recompute` and `eval` forwards communicate nothing. Throws for a wrong shape, a
  /// logit that is NaN or infinite, a microbatch counted twice in a step, or a recompute of a
  /// microbatch that had no `train` forward.
  template <Communicator Comm>
  RouterOutput<Real, memory_space> forward(View<Real const, memory_space> x, std::int64_t tokens,
                                           RouterGroups<Comm> groups, ForwardContext const& ctx = {}) {
    RouterOutput<Real, memory_space> out;
    forward(x, tokens, groups, ctx, out);
    return out;
  }
  /// As the returning `forward`, into `out` (its routing's buffers are reused when the shape
  /// matches: a layer keeps one `RouterOutput` across steps).
  template <Communicator Comm>
  void forward(View<Real const, memory_space> x, std::int64_t tokens, RouterGroups<Comm> groups,
               ForwardContext const& ctx, RouterOutput<Real, memory_space>& out) {
    auto reduce = [](Comm* c, std::span<std::int64_t> v) {
      if (c) c->all_reduce(v, ReduceOp::sum);
    };
    forward_impl(
        x, tokens, ctx, groups.tp_cp ? groups.tp_cp->size() : 1,
        groups.tp_dp_cp ? groups.tp_dp_cp->size() : 1,
        [&](std::span<std::int64_t> v) { reduce(groups.tp_cp, v); },
        [&](std::span<std::int64_t> v) { reduce(groups.tp_dp_cp, v); }, out);
  }
  /// `forward` on one rank: every statistics group has one member.
  RouterOutput<Real, memory_space> forward(View<Real const, memory_space> x, std::int64_t tokens,
                                           ForwardContext const& ctx = {}) {
    RouterOutput<Real, memory_space> out;
    auto none = [](std::span<std::int64_t>) {};
    forward_impl(x, tokens, ctx, 1, 1, none, none, out);
    return out;
  }

  /// Adds a routing's per-expert entries `[E]` (after token dropping, padding slots included, as
  /// Megatron counts its final routing map) to the expert-bias counters. No-op unless
  /// `moe_router_enable_expert_bias`. Call once per microbatch, on its `train` forward.
  void count_routed(std::span<std::int64_t const> tokens_per_expert) {
    if (local_tokens_per_expert_.empty()) return;
    MOEFOLD_EXPECTS(tokens_per_expert.size() == local_tokens_per_expert_.size(),
                    "TopKRouter::count_routed: {} counts for {} experts", tokens_per_expert.size(),
                    local_tokens_per_expert_.size());
    for (std::size_t e = 0; e < tokens_per_expert.size(); ++e)
      local_tokens_per_expert_[e] += tokens_per_expert[e];
  }

  /// Backward of the last `forward`: `d_probs [T, E]` is the gradient of the loss with respect
  /// to `routing.probs` (entries outside the routing are ignored); the auxiliary losses and the
  /// z-loss enter with weight `aux_loss_scale` (Megatron's attached-loss scale, spec §2.2.1;
  /// `aux_loss_gradient_scale` gives it). Accumulates into `weight_grad()` and writes the
  /// gradient of the input `[T, H]` to `dx`.
  void backward(View<Real const, memory_space> d_probs, View<Real, memory_space> dx,
                double aux_loss_scale = 1.0) {
    auto const t_count = tokens_;
    auto const e = static_cast<std::int64_t>(cfg_.num_experts);
    auto const k = static_cast<std::int64_t>(cfg_.moe_router_topk);
    auto const h = hidden_;
    MOEFOLD_EXPECTS(d_probs.size() == t_count * e,
                    "TopKRouter::backward: d_probs has {} entries, expected T·E = {}·{}",
                    d_probs.size(), t_count, e);
    MOEFOLD_EXPECTS(dx.size() == t_count * h && dx.contiguous(),
                    "TopKRouter::backward: dx has {} entries, expected T·H = {}·{}", dx.size(),
                    t_count, h);
    auto const logits = View<Real const, memory_space>(logits_.view(t_count, e));
    auto const d_logits = sized(d_logits_, t_count * e).reshaped(t_count, e);
    ops::route_backward<Score>(exec_, rule_, logits, View<int const, memory_space>(topk_.view()),
                               d_probs,
                               has_aux_ ? View<Real const, memory_space>(aux_scores_.view())
                                        : View<Real const, memory_space>(),
                               View<Real const, memory_space>(aux_d_scores_.view()), prob_scale(),
                               static_cast<Real>(aux_loss_scale), d_logits, sized(dk_, t_count * k),
                               sized(backward_scratch_, 2 * t_count * e));
    if (has_z_)
      z_loss_backward<Real>(exec_, logits, *cfg_.moe_z_loss_coeff, tp_cp_size_,
                            aux_loss_scale * per_token_factor_, d_logits);
    if (bf16_logits_) ops::round_through<bf16>(exec_, d_logits);
    // dW [E, H] += d_logitsᵀ [E, T] · x [T, H];  dx [T, H] = d_logits [T, E] · W [E, H].
    View<Real const, memory_space> const dl = d_logits;
    gemm<Real>(exec_, Trans::yes, Trans::no, compute_t<Real>(1), dl, x_.view(t_count, h),
               compute_t<Real>(1), weight_.grad.view(e, h));
    auto const dx2 = dx.reshaped(t_count, h);
    ops::fill(exec_, dx2, Real(0));
    gemm<Real>(exec_, Trans::no, Trans::no, compute_t<Real>(1), dl, weight_.value.view(e, h),
               compute_t<Real>(0), dx2);
    if (jittered_)  // x_ is x ⊙ noise: d x = d x_jittered ⊙ noise (same map)
      apply_input_jitter<Real>(exec_, jitter_key_, dx, jitter_tokens_.view(), h,
                               *cfg_.moe_input_jitter_eps, dx);
  }
  /// `backward` into a new buffer `[T, H]`.
  Buffer<Real, memory_space> backward(View<Real const, memory_space> d_probs,
                                      double aux_loss_scale = 1.0) {
    auto dx = exec_.template allocate<Real>(tokens_ * hidden_);
    backward(d_probs, dx.view(), aux_loss_scale);
    return dx;
  }

  /// Aux-loss-free balancing (spec §2.2.2) from counters already summed over `tp_dp_cp`:
  /// `bias_e += rate · sign(mean − count_e)`, then zeroes the counters. The step finalizer
  /// calls it once per global batch with every router's counters reduced in one collective.
  void apply_expert_bias_update() {
    MOEFOLD_EXPECTS(cfg_.moe_router_enable_expert_bias,
                    "the expert-bias update needs moe_router_enable_expert_bias");
    double mean = 0;
    for (auto c : local_tokens_per_expert_) mean += static_cast<double>(c);
    mean /= static_cast<double>(local_tokens_per_expert_.size());
    auto const counts =
        sized(bias_counts_, static_cast<std::int64_t>(local_tokens_per_expert_.size()));
    copy<std::int64_t>(exec_, View<std::int64_t const>(local_tokens_per_expert_), counts);
    ops::expert_bias_update(exec_, View<std::int64_t const, memory_space>(counts), mean,
                            cfg_.moe_router_bias_update_rate, expert_bias_.view());
    std::fill(local_tokens_per_expert_.begin(), local_tokens_per_expert_.end(), 0);
  }
  /// `apply_expert_bias_update` after summing the counters over `tp_dp_cp` (null: one rank).
  /// Collective over `tp_dp_cp`.
  template <Communicator Comm>
  void update_expert_bias(Comm* tp_dp_cp) {
    MOEFOLD_EXPECTS(cfg_.moe_router_enable_expert_bias,
                    "update_expert_bias needs moe_router_enable_expert_bias");
    if (tp_dp_cp) tp_dp_cp->all_reduce(std::span<std::int64_t>(local_tokens_per_expert_));
    apply_expert_bias_update();
  }
  /// Ends a step: resets the global aux loss's running counts and forgets the microbatches'
  /// statistics kept for recomputation (the step finalizer calls it once per global batch).
  void reset_step_state() {
    std::fill(global_counts_.begin(), global_counts_.end(), 0.0);
    global_steps_ = 0;
    replay_.clear();
  }

 private:
  /// The reduced statistics of one `train` forward, kept for the recompute of its microbatch:
  /// per enabled load-balancing type, the counts its loss used.
  using Statistics = std::vector<std::vector<double>>;

  /// `b` as n elements (reallocated only when its size changes: per-step temporaries reuse it).
  template <class U>
  View<U, memory_space> sized(Buffer<U, memory_space>& b, std::int64_t n) {
    if (static_cast<std::int64_t>(b.size()) != n) b = exec_.template allocate<U>(n);
    return b.view();
  }
  /// Host copies of n elements of a buffer of the instance (statistics, flags).
  template <class U>
  std::vector<U> to_host(View<U const, memory_space> v) const {
    std::vector<U> out(static_cast<std::size_t>(v.size()));
    copy<U>(exec_, v, View<U>(out));
    return out;
  }

  /// What backward reads of the last forward.
  auto saved() {
    return std::tie(tokens_, tp_cp_size_, has_aux_, has_z_, jittered_, per_token_factor_,
                    jitter_key_, jitter_tokens_, x_, logits_, aux_scores_, aux_d_scores_, topk_);
  }

  Real prob_scale() const noexcept {
    return cfg_.moe_router_topk_scaling_factor && !cfg_.sinkhorn()
               ? static_cast<Real>(*cfg_.moe_router_topk_scaling_factor)
               : Real(1);
  }

  template <class ReduceTpCp, class ReduceTpDpCp>
  void forward_impl(View<Real const, memory_space> x, std::int64_t tokens,
                    ForwardContext const& ctx, int tp_cp_size, int tp_dp_cp_size,
                    ReduceTpCp&& reduce_tp_cp, ReduceTpDpCp&& reduce_tp_dp_cp,
                    RouterOutput<Real, memory_space>& out) {
    auto const h = hidden_;
    auto const e = static_cast<std::int64_t>(cfg_.num_experts);
    auto const k = static_cast<std::int64_t>(cfg_.moe_router_topk);
    bool const training = ctx.mode != ForwardMode::eval;
    MOEFOLD_EXPECTS(tokens >= 0 && x.size() == tokens * h,
                    "TopKRouter::forward: input has {} elements, expected T·H = {}·{}", x.size(),
                    tokens, h);
    if (ctx.batch != 0)
      MOEFOLD_EXPECTS(ctx.batch >= 1 && tokens % ctx.batch == 0,
                      "TopKRouter::forward: {} tokens are not a multiple of the micro-batch size "
                      "B = {} of the [S_loc, B] layout",
                      tokens, ctx.batch);
    Statistics const* replay = nullptr;
    if (ctx.mode == ForwardMode::recompute) {
      MOEFOLD_EXPECTS(ctx.microbatch >= 0,
                      "TopKRouter::forward: a recompute needs the microbatch index it replays");
      auto const it = replay_.find(ctx.microbatch);
      MOEFOLD_EXPECTS(it != replay_.end(),
                      "TopKRouter::forward: recompute of microbatch {} before its train forward "
                      "in this step",
                      ctx.microbatch);
      replay = &it->second;
    } else if (ctx.mode == ForwardMode::train && ctx.microbatch >= 0) {
      MOEFOLD_EXPECTS(!replay_.contains(ctx.microbatch),
                      "TopKRouter::forward: microbatch {} had a train forward already in this "
                      "step (a recomputation must use ForwardMode::recompute)",
                      ctx.microbatch);
    }
    tokens_ = tokens;
    tp_cp_size_ = tp_cp_size;
    auto const xs = sized(x_, tokens * h);
    copy<Real>(exec_, x, xs);
    jittered_ = false;
    if (cfg_.moe_input_jitter_eps && *cfg_.moe_input_jitter_eps > 0 && training) {
      MOEFOLD_EXPECTS(ctx.token_index.size() == static_cast<std::size_t>(tokens),
                      "TopKRouter::forward: moe_input_jitter_eps needs the global index of each "
                      "of the {} tokens (ForwardContext::token_index has {})",
                      tokens, ctx.token_index.size());
      jitter_key_ = JitterKey{
          .seed = seed_, .step = static_cast<std::uint64_t>(ctx.step), .layer_key = layer_key_};
      auto const ids = sized(jitter_tokens_, tokens);
      copy<std::int64_t>(exec_, View<std::int64_t const>(ctx.token_index), ids);
      apply_input_jitter<Real>(exec_, jitter_key_, x, ids, h, *cfg_.moe_input_jitter_eps, xs);
      jittered_ = true;
    }
    auto const logits = sized(logits_, tokens * e).reshaped(tokens, e);
    ops::fill(exec_, logits, Real(0));
    gemm<Real>(exec_, Trans::no, Trans::yes, compute_t<Real>(1), xs.reshaped(tokens, h),
               weight_.value.view(e, h), compute_t<Real>(0), logits);
    if (bf16_logits_) ops::round_through<bf16>(exec_, logits);
    reset(out, tokens, e);
    check_finite(tokens, e, out.routing);
    View<Real const, memory_space> select;  // Sinkhorn's selection values in training [T, E]
    if (cfg_.sinkhorn() && training) {
      auto const normalized = sized(normalized_, tokens * e);
      sinkhorn<Real>(exec_, sinkhorn_work_, logits, tokens, e, normalized);
      select = normalized;
    }
    ops::route_tokens<Score>(exec_, rule_, View<Real const, memory_space>(logits),
                             View<Real const, memory_space>(expert_bias_.view()), select,
                             prob_scale(), sized(topk_, tokens * k),
                             out.routing.map.view(), Route::routed, out.routing.probs.view(),
                             sized(sel_, tokens * e),
                             sized(route_scratch_, tokens * ops::route_scratch_stride(rule_)),
                             sized(top_probs_, tokens * k));

    // Auxiliary losses and z-loss: training and recompute only (Megatron: training with grad).
    // Per-token-loss mode attaches them multiplied by this rank's tokens · |tp_cp| (spec §2.2).
    per_token_factor_ =
        cfg_.calculate_per_token_loss ? static_cast<double>(tokens) * tp_cp_size : 1.0;
    has_aux_ = false;
    if (training)
      for (std::size_t i = 0; i < cfg_.moe_router_load_balancing_type.size(); ++i)
        if (is_aux_type(cfg_.moe_router_load_balancing_type[i]) && cfg_.aux_loss_coeff(i) != 0.0)
          has_aux_ = true;
    Statistics kept;
    if (has_aux_)
      aux_forward(out, tokens, ctx.batch, tp_cp_size, tp_dp_cp_size, reduce_tp_cp, reduce_tp_dp_cp,
                  replay, kept);
    has_z_ = training && cfg_.moe_z_loss_coeff.has_value();
    if (has_z_)
      out.z_loss = per_token_factor_ * z_loss<Real>(exec_, View<Real const, memory_space>(logits),
                                                    *cfg_.moe_z_loss_coeff, tp_cp_size, z_work_);
    if (ctx.mode == ForwardMode::train && ctx.microbatch >= 0)
      replay_.emplace(ctx.microbatch, std::move(kept));
  }

  /// `out` emptied for T tokens: every routing entry `none` with probability 0 (buffers reused
  /// when the shape matches), no losses.
  void reset(RouterOutput<Real, memory_space>& out, std::int64_t tokens, std::int64_t e) {
    auto& r = out.routing;
    if (static_cast<std::int64_t>(r.map.size()) != tokens * e ||
        static_cast<std::int64_t>(r.probs.size()) != tokens * e) {
      r = Routing<Real, memory_space>::empty(exec_, tokens, e);
    } else {
      r.num_tokens = tokens;
      r.num_experts = e;
      ops::fill(exec_, r.map.view(), Route::none);
      ops::fill(exec_, r.probs.view(), Real(0));
    }
    r.non_finite = Buffer<std::int64_t, memory_space>();
    out.aux_losses.clear();
    out.z_loss = 0;
  }

  /// Throws naming the first token (and its first expert) whose logit is NaN or infinite; on a
  /// device, leaves each token's first such expert in `routing.non_finite` instead (checked with
  /// the dispatcher's copy of counts, not with a copy of its own).
  void check_finite(std::int64_t tokens, std::int64_t e, Routing<Real, memory_space>& routing) {
    if constexpr (!memory_space::host_accessible) {
      routing.non_finite = exec_.template allocate<std::int64_t>(tokens);
      ops::first_non_finite(exec_, View<Real const, memory_space>(logits_.view(tokens, e)),
                            routing.non_finite.view());
      return;
    }
    auto const bad = sized(non_finite_, tokens);
    ops::first_non_finite(exec_, View<Real const, memory_space>(logits_.view(tokens, e)), bad);
    auto const rows = to_host(View<std::int64_t const, memory_space>(bad));
    for (std::int64_t t = 0; t < tokens; ++t) {
      auto const c = rows[static_cast<std::size_t>(t)];
      if (c < 0) continue;
      Real v{};
      copy<Real>(exec_, View<Real const, memory_space>(logits_.data() + t * e + c, 1),
                 View<Real>(&v, 1));
      MOEFOLD_EXPECTS(false,
                      "TopKRouter::forward: logit of token {} for expert {} is {} (NaN or "
                      "infinite input or weight)",
                      t, c, static_cast<double>(v));
    }
  }

  static constexpr bool is_aux_type(LoadBalancingType t) noexcept {
    return t == LoadBalancingType::aux_loss || t == LoadBalancingType::seq_aux_loss ||
           t == LoadBalancingType::global_aux_loss;
  }

  /// The load-balancing losses and ∂(Σ losses)/∂scores, saved for backward. The counts each loss
  /// uses come from `replay` on a recompute, else from the collectives (and go to `kept`).
  template <class ReduceTpCp, class ReduceTpDpCp>
  void aux_forward(RouterOutput<Real, memory_space>& out, std::int64_t tokens, std::int64_t batch, int tp_cp_size,
                   int tp_dp_cp_size, ReduceTpCp& reduce_tp_cp, ReduceTpDpCp& reduce_tp_dp_cp,
                   Statistics const* replay, Statistics& kept) {
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const e = static_cast<std::int64_t>(e_count);
    auto const k_count = static_cast<std::int64_t>(cfg_.moe_router_topk);
    bool const seq =
        std::find(cfg_.moe_router_load_balancing_type.begin(),
                  cfg_.moe_router_load_balancing_type.end(),
                  LoadBalancingType::seq_aux_loss) != cfg_.moe_router_load_balancing_type.end();
    MOEFOLD_EXPECTS(!seq || batch >= 1,
                    "TopKRouter::forward: seq_aux_loss needs the micro-batch size B of the "
                    "[S_loc, B] token layout (ForwardContext::batch is {})",
                    batch);
    auto const b_count = std::max<std::int64_t>(batch, 1);
    // Scores over all E and a plain top-K map: no groups, no bias, no dropping.
    auto const logits = View<Real const, memory_space>(logits_.view(tokens, e));
    auto const scores = sized(aux_scores_, tokens * e).reshaped(tokens, e);
    auto const d_scores = sized(aux_d_scores_, tokens * e).reshaped(tokens, e);
    ops::fill(exec_, d_scores, Real(0));
    auto const idx = sized(aux_topk_, tokens * k_count);
    ops::aux_scores_top_k<Score>(exec_, rule_, logits, scores, idx);
    // Per expert (and per sequence slot b = t mod B): tokens choosing it, column sums.
    auto statistics_of = [&](std::int64_t slots, Buffer<std::int64_t, memory_space>& counts,
                             Buffer<Real, memory_space>& sums) {
      auto const c = sized(counts, slots * e);
      auto const s = sized(sums, slots * e);
      auto const keys = slots > 1 ? sized(aux_keys_, tokens * k_count) : aux_keys_.view();
      ops::column_statistics(exec_, View<int const, memory_space>(idx),
                             View<Real const, memory_space>(scores), k_count, slots, keys, c, s);
      return std::pair(to_host(View<std::int64_t const, memory_space>(c)),
                       to_host(View<Real const, memory_space>(s)));
    };
    auto const [counts, sums] = statistics_of(1, counts_, sums_);
    std::vector<std::int64_t> seq_counts;
    std::vector<Real> seq_sums;
    if (seq) std::tie(seq_counts, seq_sums) = statistics_of(b_count, seq_counts_, seq_sums_);
    // The counts loss i uses: replayed, or reduced over its group now (and kept).
    auto statistics = [&](std::size_t i, std::vector<std::int64_t> local, auto& reduce) {
      if (replay) {
        MOEFOLD_EXPECTS(i < replay->size() && (*replay)[i].size() == local.size(),
                        "TopKRouter: the recompute's statistics do not match its train forward "
                        "(load-balancing type {}, {} counts)",
                        i, local.size());
        return (*replay)[i];
      }
      reduce(std::span<std::int64_t>(local));
      std::vector<double> n(local.begin(), local.end());
      return n;
    };
    // d_scores += w · n[(t mod slots)·E + c]
    auto add_gradient = [&](std::vector<double> const& n, std::int64_t slots, double w) {
      auto const nd = sized(counts_gradient_, static_cast<std::int64_t>(n.size()));
      copy<double>(exec_, View<double const>(n), nd);
      ops::add_counts_gradient(exec_, View<double const, memory_space>(nd), slots, w, d_scores);
    };
    int const k = cfg_.moe_router_topk;
    kept.assign(cfg_.moe_router_load_balancing_type.size(), {});
    for (std::size_t i = 0; i < cfg_.moe_router_load_balancing_type.size(); ++i) {
      auto const type = cfg_.moe_router_load_balancing_type[i];
      double const coeff = cfg_.aux_loss_coeff(i);
      if (!is_aux_type(type) || coeff == 0.0) continue;
      double value = 0;
      std::vector<double> n;
      if (type == LoadBalancingType::aux_loss) {
        n = statistics(i, counts, reduce_tp_cp);
        double const ttot = static_cast<double>(tokens) * tp_cp_size;
        value = switch_load_balancing_loss<Real, double>(sums, n, e, k, ttot, coeff);
        double const w = switch_loss_weight(e, k, ttot, coeff) * per_token_factor_;
        add_gradient(n, 1, w);
      } else if (type == LoadBalancingType::seq_aux_loss) {
        n = statistics(i, seq_counts, reduce_tp_cp);
        auto const bb = static_cast<double>(b_count);
        double const ttot = static_cast<double>(tokens) / bb * tp_cp_size;
        value = switch_load_balancing_loss<Real, double>(seq_sums, n, e, k, ttot, coeff) / bb;
        double const w = switch_loss_weight(e, k, ttot, coeff) / bb * per_token_factor_;
        add_gradient(n, b_count, w);
      } else {  // global_aux_loss: the running mean of the step's reduced counts
        n = statistics(i, counts, reduce_tp_dp_cp);
        if (!replay) {  // a train forward: the running mean over the step's microbatches
          auto const reduced = std::exchange(n, std::vector<double>(e_count));
          ++global_steps_;
          for (std::size_t c = 0; c < e_count; ++c) {
            global_counts_[c] += reduced[c];
            n[c] = global_counts_[c] / static_cast<double>(global_steps_);
          }
        }
        double const ttot = static_cast<double>(tokens) * tp_dp_cp_size;
        value = switch_load_balancing_loss<Real, double>(sums, n, e, k, ttot, coeff);
        double const w = switch_loss_weight(e, k, ttot, coeff) * per_token_factor_;
        add_gradient(n, 1, w);
      }
      out.aux_losses.push_back({type, value * per_token_factor_});
      kept[i] = std::move(n);
    }
  }

  Exec exec_;
  RouterConfig cfg_;
  ops::RouterRule rule_;
  std::int64_t hidden_;
  std::uint64_t seed_ = 0;
  std::uint64_t layer_key_ = 0;
  Param<Real, memory_space> weight_;
  Buffer<Real, memory_space> expert_bias_;
  std::vector<std::int64_t> local_tokens_per_expert_;  // host metadata
  std::vector<double> global_counts_;
  std::int64_t global_steps_ = 0;
  std::map<int, Statistics> replay_;  // this step's train forwards, by microbatch
  // Saved by forward for backward.
  std::int64_t tokens_ = 0;
  int tp_cp_size_ = 1;
  bool has_aux_ = false, has_z_ = false, jittered_ = false;
  bool bf16_logits_ = false;  // round_logits_to_bf16
  double per_token_factor_ = 1.0;
  JitterKey jitter_key_;
  Buffer<std::int64_t, memory_space> jitter_tokens_;
  Buffer<Real, memory_space> x_, logits_, aux_scores_, aux_d_scores_;
  Buffer<int, memory_space> topk_;
  // Per-step temporaries, reused across calls.
  Buffer<Real, memory_space> sel_, route_scratch_, top_probs_, normalized_, sums_, seq_sums_;
  Buffer<Real, memory_space> d_logits_, dk_, backward_scratch_;
  Buffer<int, memory_space> aux_topk_;
  Buffer<std::int64_t, memory_space> counts_, seq_counts_, aux_keys_, non_finite_, bias_counts_;
  Buffer<double, memory_space> counts_gradient_, z_work_, sinkhorn_work_;
  MicrobatchStash stash_;
};

namespace cpu {
template <RouterScore Score, class Real = float>
using TopKRouter = moefold::TopKRouter<Cpu, Score, Real>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
