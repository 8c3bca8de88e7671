#pragma once
/// \file
/// `TopKRouter<Score, Real>`: Megatron's router (spec §2.2) — gating logits from a weight
/// `[E, H]`, score function and (group-limited) top-k, expert bias for aux-loss-free balancing,
/// load-balancing losses and z-loss, forward and backward. Token dropping is a dispatcher policy
/// (capacity.hpp): it is decided per source rank on the routing this router returns.
///
///   moefold::TopKRouter<moefold::SoftmaxScore> router(cfg, hidden);
///   auto out = router.forward(x, tokens, {.tp_cp = &groups.tp_cp()},
///                             {.mode = ForwardMode::train, .batch = B, .microbatch = mb});
///   auto dx = router.backward(d_probs);                                  // + router.weight_grad()

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <span>
#include <utility>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/init.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/moe/aux_losses.hpp"
#include "moefold/moe/input_jitter.hpp"
#include "moefold/moe/router_config.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/moe/score_functions.hpp"
#include "moefold/moe/sinkhorn.hpp"
#include "moefold/moe/top_k.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/core/param.hpp"

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

/// What the router returns for T local tokens.
template <class Real>
struct RouterOutput {
  Routing<Real> routing;                 ///< K routed entries per token, probs (scaled)
  std::vector<AuxLossValue> aux_losses;  ///< one per enabled type with a non-zero coefficient
  double z_loss = 0;                     ///< 0 when no z-loss coefficient is set
};

/// The top-k router. Holds its weight `[E, H]`, the weight's gradient, the expert bias, the
/// expert-bias counters and the per-step statistics of the auxiliary losses. One forward is
/// followed by at most one backward.
///
/// Per-step state follows `ForwardContext` (Megatron's semantics, spec §2.2): a `train` forward
/// reduces and keeps its statistics (per microbatch, for a later `recompute`) and advances the
/// global aux loss's running sums; a `recompute` replays them without a collective; an `eval`
/// forward computes no auxiliary loss and changes nothing. Expert-bias counts are added by
/// `count_routed`, from the routing after token dropping (the MoE layer calls it on `train`
/// forwards). `reset_step_state` (the step finalizer) ends a step.
template <RouterScore Score, class Real = float>
class TopKRouter {
 public:
  /// Throws `invalid_config` when `cfg` breaks a rule or names another score function.
  /// `weight_name` names the weight parameter (e.g. "layers.0.mlp.router.weight"); `seed` keys
  /// the input jitter's noise (with the step, the weight's name, the token and the feature).
  TopKRouter(RouterConfig cfg, std::int64_t hidden_size, std::string weight_name = "router.weight",
             std::uint64_t seed = 0)
      : cfg_(std::move(cfg)), hidden_(hidden_size), seed_(seed) {
    cfg_.validate();
    if (!Score::accepts(cfg_.moe_router_score_function))
      throw invalid_config(fmt::format(
          "moe_router_score_function = {} is not a variant of the router's score policy",
          name(cfg_.moe_router_score_function)));
    if (hidden_size < 1) throw invalid_config(fmt::format("hidden size {} < 1", hidden_size));
    auto const e = static_cast<std::size_t>(cfg_.num_experts);
    // Replicated across TP under sequence parallelism: its gradient is also summed over tp.
    weight_ = Param<Real>::whole(std::move(weight_name), ParamClass::tp_replicated,
                                 cfg_.num_experts, hidden_size);
    layer_key_ = detail::hash_name(weight_.name);
    if (cfg_.moe_router_enable_expert_bias) {
      expert_bias_.assign(e, Real(0));
      local_tokens_per_expert_.assign(e, 0);
    }
    global_counts_.assign(e, 0.0);
    sinkhorn_cfg_ = cfg_;
    sinkhorn_cfg_.moe_router_pre_softmax = true;  // Sinkhorn's activation: softmax over all E
  }

  RouterConfig const& config() const noexcept { return cfg_; }
  std::int64_t hidden_size() const noexcept { return hidden_; }
  /// The weight `[E, H]` (Megatron's layout).
  std::span<Real> weight() noexcept { return weight_.value; }
  std::span<Real const> weight() const noexcept { return weight_.value; }
  /// The weight as a parameter (value and gradient), for gradient reduction and checkpoints.
  Param<Real>& weight_param() noexcept { return weight_; }
  /// The weight's gradient, accumulated by `backward`.
  std::span<Real> weight_grad() noexcept { return weight_.grad; }
  /// The expert bias `[E]` (empty unless `moe_router_enable_expert_bias`).
  std::span<Real> expert_bias() noexcept { return expert_bias_; }
  /// Routed tokens per expert since the last bias update `[E]` (empty unless
  /// `moe_router_enable_expert_bias`). The step finalizer all-reduces them in place.
  std::span<std::int64_t> local_tokens_per_expert() noexcept { return local_tokens_per_expert_; }
  std::span<std::int64_t const> local_tokens_per_expert() const noexcept {
    return local_tokens_per_expert_;
  }

  /// Routes the `tokens` local tokens `x [T, H]` (token `t = s·B + b`, B = `ctx.batch`).
  /// On a `train` forward, collective over `groups.tp_cp` when an aux/seq-aux loss is enabled
  /// and over `groups.tp_dp_cp` when the global aux loss is: every rank of those groups must
  /// call it; `recompute` and `eval` forwards communicate nothing. Throws for a wrong shape, a
  /// logit that is NaN or infinite, a microbatch counted twice in a step, or a recompute of a
  /// microbatch that had no `train` forward.
  template <Communicator Comm>
  RouterOutput<Real> forward(std::span<Real const> x, std::int64_t tokens,
                             RouterGroups<Comm> groups, ForwardContext const& ctx = {}) {
    auto reduce = [](Comm* c, std::span<std::int64_t> v) {
      if (c) c->all_reduce(v, ReduceOp::sum);
    };
    return forward_impl(
        x, tokens, ctx, groups.tp_cp ? groups.tp_cp->size() : 1,
        groups.tp_dp_cp ? groups.tp_dp_cp->size() : 1,
        [&](std::span<std::int64_t> v) { reduce(groups.tp_cp, v); },
        [&](std::span<std::int64_t> v) { reduce(groups.tp_dp_cp, v); });
  }
  /// `forward` on one rank: every statistics group has one member.
  RouterOutput<Real> forward(std::span<Real const> x, std::int64_t tokens,
                             ForwardContext const& ctx = {}) {
    auto none = [](std::span<std::int64_t>) {};
    return forward_impl(x, tokens, ctx, 1, 1, none, none);
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
  /// `aux_loss_gradient_scale` gives it). Accumulates into `weight_grad()` and returns the
  /// gradient of the input `[T, H]`.
  std::vector<Real> backward(std::span<Real const> d_probs, double aux_loss_scale = 1.0) {
    auto const t_count = tokens_;
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const k_count = static_cast<std::size_t>(cfg_.moe_router_topk);
    MOEFOLD_EXPECTS(d_probs.size() == static_cast<std::size_t>(t_count) * e_count,
                    "TopKRouter::backward: d_probs has {} entries, expected T·E = {}·{}",
                    d_probs.size(), t_count, e_count);
    std::vector<Real> d_logits(logits_.size(), Real(0));
    std::vector<Real> scratch(2 * e_count), dk(k_count);
    Real const scale = prob_scale();
    for (std::int64_t t = 0; t < t_count; ++t) {
      auto const row = static_cast<std::size_t>(t) * e_count;
      auto const idx =
          std::span<int const>(topk_).subspan(static_cast<std::size_t>(t) * k_count, k_count);
      for (std::size_t k = 0; k < k_count; ++k)
        dk[k] = scale * d_probs[row + static_cast<std::size_t>(idx[k])];
      auto lrow = std::span<Real const>(logits_).subspan(row, e_count);
      auto drow = std::span<Real>(d_logits).subspan(row, e_count);
      if (cfg_.sinkhorn())
        sinkhorn_activation_backward(lrow, idx, dk, drow, scratch);
      else
        Score::template backward<Real>(cfg_, lrow, idx, dk, drow, scratch);
      if (has_aux_) {
        auto s = std::span<Real>(scratch).first(e_count);
        for (std::size_t e = 0; e < e_count; ++e)
          s[e] = static_cast<Real>(aux_loss_scale) * aux_d_scores_[row + e];
        Score::template aux_scores_backward<Real>(
            cfg_, lrow, std::span<Real const>(aux_scores_).subspan(row, e_count), s, drow);
      }
    }
    if (has_z_)
      z_loss<Real>(logits_, t_count, cfg_.num_experts, *cfg_.moe_z_loss_coeff, tp_cp_size_,
                   d_logits, aux_loss_scale * per_token_factor_);
    auto const h = hidden_;
    auto const e = static_cast<std::int64_t>(e_count);
    // dW [E, H] += d_logitsᵀ [E, T] · x [T, H];  dx [T, H] = d_logits [T, E] · W [E, H].
    gemm<Real>(Trans::yes, Trans::no, e, h, t_count, Real(1), d_logits.data(), e, x_.data(), h,
               Real(1), weight_.grad.data(), h);
    std::vector<Real> dx(static_cast<std::size_t>(t_count * h), Real(0));
    gemm<Real>(Trans::no, Trans::no, t_count, h, e, Real(1), d_logits.data(), e,
               weight_.value.data(), h, Real(0), dx.data(), h);
    if (!jitter_tokens_.empty())  // x_ is x ⊙ noise: d x = d x_jittered ⊙ noise (same map)
      apply_input_jitter<Real>(jitter_key_, dx, jitter_tokens_, h, *cfg_.moe_input_jitter_eps,
                               std::span<Real>(dx));
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
    for (std::size_t e = 0; e < expert_bias_.size(); ++e) {
      double const d = mean - static_cast<double>(local_tokens_per_expert_[e]);
      expert_bias_[e] += static_cast<Real>(cfg_.moe_router_bias_update_rate *
                                           static_cast<double>((d > 0) - (d < 0)));
    }
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

  Real prob_scale() const noexcept {
    return cfg_.moe_router_topk_scaling_factor && !cfg_.sinkhorn()
               ? static_cast<Real>(*cfg_.moe_router_topk_scaling_factor)
               : Real(1);
  }

  /// Sinkhorn's activation on one token's logits: sigmoid for top-1, softmax over all E above.
  void sinkhorn_activation(std::span<Real const> logits, std::span<Real> out) const {
    if (cfg_.moe_router_topk == 1)
      for (std::size_t e = 0; e < logits.size(); ++e) out[e] = detail::sigmoid(logits[e]);
    else
      detail::softmax_row(logits, out);
  }
  void sinkhorn_activation_backward(std::span<Real const> logits, std::span<int const> idx,
                                    std::span<Real const> dk, std::span<Real> d_logits,
                                    std::span<Real> scratch) const {
    if (cfg_.moe_router_topk == 1)  // one chosen score, not renormalized
      SigmoidScore::template backward<Real>(cfg_, logits, idx, dk, d_logits, scratch);
    else
      SoftmaxScore::template backward<Real>(sinkhorn_cfg_, logits, idx, dk, d_logits, scratch);
  }

  template <class ReduceTpCp, class ReduceTpDpCp>
  RouterOutput<Real> forward_impl(std::span<Real const> x, std::int64_t tokens,
                                  ForwardContext const& ctx, int tp_cp_size, int tp_dp_cp_size,
                                  ReduceTpCp&& reduce_tp_cp, ReduceTpDpCp&& reduce_tp_dp_cp) {
    auto const h = hidden_;
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const k_count = static_cast<std::size_t>(cfg_.moe_router_topk);
    auto const e = static_cast<std::int64_t>(e_count);
    bool const training = ctx.mode != ForwardMode::eval;
    MOEFOLD_EXPECTS(tokens >= 0 && x.size() == static_cast<std::size_t>(tokens * h),
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
    x_.assign(x.begin(), x.end());
    jitter_tokens_.clear();
    if (cfg_.moe_input_jitter_eps && *cfg_.moe_input_jitter_eps > 0 && training) {
      MOEFOLD_EXPECTS(ctx.token_index.size() == static_cast<std::size_t>(tokens),
                      "TopKRouter::forward: moe_input_jitter_eps needs the global index of each "
                      "of the {} tokens (ForwardContext::token_index has {})",
                      tokens, ctx.token_index.size());
      jitter_key_ = JitterKey{
          .seed = seed_, .step = static_cast<std::uint64_t>(ctx.step), .layer_key = layer_key_};
      jitter_tokens_.assign(ctx.token_index.begin(), ctx.token_index.end());
      apply_input_jitter<Real>(jitter_key_, x, jitter_tokens_, h, *cfg_.moe_input_jitter_eps,
                               std::span<Real>(x_));
    }
    logits_.assign(static_cast<std::size_t>(tokens) * e_count, Real(0));
    gemm<Real>(Trans::no, Trans::yes, tokens, e, h, Real(1), x_.data(), h, weight_.value.data(), h,
               Real(0), logits_.data(), e);
    for (std::size_t i = 0; i < logits_.size(); ++i)
      MOEFOLD_EXPECTS(std::isfinite(static_cast<double>(logits_[i])),
                      "TopKRouter::forward: logit of token {} for expert {} is {} (NaN or "
                      "infinite input or weight)",
                      i / e_count, i % e_count, static_cast<double>(logits_[i]));

    RouterOutput<Real> out;
    out.routing = Routing<Real>::empty(tokens, e);
    topk_.assign(static_cast<std::size_t>(tokens) * k_count, 0);
    std::vector<Real> sel(e_count), probs(k_count),
        scratch(2 * e_count + cfg_.moe_router_num_groups + e_count);
    std::vector<Real> normalized;  // Sinkhorn's selection values in training [T, E]
    if (cfg_.sinkhorn() && training) {
      normalized.resize(logits_.size());
      sinkhorn<Real>(logits_, tokens, e, normalized);
    }
    Real const scale = prob_scale();
    for (std::int64_t t = 0; t < tokens; ++t) {
      auto const row = static_cast<std::size_t>(t) * e_count;
      auto lrow = std::span<Real const>(logits_).subspan(row, e_count);
      auto idx = std::span<int>(topk_).subspan(static_cast<std::size_t>(t) * k_count, k_count);
      if (cfg_.sinkhorn()) {
        // Selected on the Sinkhorn-normalized logits in training, on the activation otherwise;
        // the probabilities are the activation's, not renormalized (Megatron's S-BASE).
        sinkhorn_activation(lrow, sel);
        top_k<Real>(training ? std::span<Real const>(normalized).subspan(row, e_count)
                             : std::span<Real const>(sel),
                    idx);
        for (std::size_t k = 0; k < k_count; ++k) probs[k] = sel[static_cast<std::size_t>(idx[k])];
      } else {
        Score::template selection_values<Real>(cfg_, lrow, expert_bias_, sel);
        if (cfg_.moe_router_num_groups > 0)
          group_limited_top_k<Real>(sel, cfg_.moe_router_num_groups, cfg_.moe_router_group_topk,
                                    idx, scratch);
        else
          top_k<Real>(sel, idx);
        Score::template probs<Real>(cfg_, lrow, idx, probs, scratch);
      }
      for (std::size_t k = 0; k < k_count; ++k) {
        auto const at = row + static_cast<std::size_t>(idx[k]);
        out.routing.map[at] = Route::routed;
        out.routing.probs[at] = scale * probs[k];
      }
    }

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
      out.z_loss =
          per_token_factor_ * z_loss<Real>(logits_, tokens, e, *cfg_.moe_z_loss_coeff, tp_cp_size);
    if (ctx.mode == ForwardMode::train && ctx.microbatch >= 0)
      replay_.emplace(ctx.microbatch, std::move(kept));
    return out;
  }

  static constexpr bool is_aux_type(LoadBalancingType t) noexcept {
    return t == LoadBalancingType::aux_loss || t == LoadBalancingType::seq_aux_loss ||
           t == LoadBalancingType::global_aux_loss;
  }

  /// The load-balancing losses and ∂(Σ losses)/∂scores, saved for backward. The counts each loss
  /// uses come from `replay` on a recompute, else from the collectives (and go to `kept`).
  template <class ReduceTpCp, class ReduceTpDpCp>
  void aux_forward(RouterOutput<Real>& out, std::int64_t tokens, std::int64_t batch, int tp_cp_size,
                   int tp_dp_cp_size, ReduceTpCp& reduce_tp_cp, ReduceTpDpCp& reduce_tp_dp_cp,
                   Statistics const* replay, Statistics& kept) {
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const k_count = static_cast<std::size_t>(cfg_.moe_router_topk);
    auto const e = static_cast<std::int64_t>(e_count);
    bool const seq =
        std::find(cfg_.moe_router_load_balancing_type.begin(),
                  cfg_.moe_router_load_balancing_type.end(),
                  LoadBalancingType::seq_aux_loss) != cfg_.moe_router_load_balancing_type.end();
    MOEFOLD_EXPECTS(!seq || batch >= 1,
                    "TopKRouter::forward: seq_aux_loss needs the micro-batch size B of the "
                    "[S_loc, B] token layout (ForwardContext::batch is {})",
                    batch);
    auto const b_count = static_cast<std::size_t>(std::max<std::int64_t>(batch, 1));
    aux_scores_.assign(logits_.size(), Real(0));
    aux_d_scores_.assign(logits_.size(), Real(0));
    // Scores over all E and a plain top-K map: no groups, no bias, no dropping.
    std::vector<int> idx(k_count);
    std::vector<std::int64_t> counts(e_count, 0), seq_counts(b_count * e_count, 0);
    std::vector<Real> sums(e_count, Real(0)), seq_sums(b_count * e_count, Real(0));
    for (std::int64_t t = 0; t < tokens; ++t) {
      auto const row = static_cast<std::size_t>(t) * e_count;
      auto s = std::span<Real>(aux_scores_).subspan(row, e_count);
      Score::template aux_scores<Real>(cfg_, std::span<Real const>(logits_).subspan(row, e_count),
                                       s);
      top_k<Real>(std::span<Real const>(s), idx);
      auto const b = static_cast<std::size_t>(t) % b_count;
      for (int i : idx) {
        ++counts[static_cast<std::size_t>(i)];
        ++seq_counts[b * e_count + static_cast<std::size_t>(i)];
      }
      for (std::size_t c = 0; c < e_count; ++c) {
        sums[c] += s[c];
        seq_sums[b * e_count + c] += s[c];
      }
    }
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
        for (std::size_t a = 0; a < aux_d_scores_.size(); ++a)
          aux_d_scores_[a] += static_cast<Real>(w * n[a % e_count]);
      } else if (type == LoadBalancingType::seq_aux_loss) {
        n = statistics(i, seq_counts, reduce_tp_cp);
        auto const bb = static_cast<double>(b_count);
        double const ttot = static_cast<double>(tokens) / bb * tp_cp_size;
        value = switch_load_balancing_loss<Real, double>(seq_sums, n, e, k, ttot, coeff) / bb;
        double const w = switch_loss_weight(e, k, ttot, coeff) / bb * per_token_factor_;
        for (std::size_t a = 0; a < aux_d_scores_.size(); ++a) {
          auto const t = a / e_count;
          aux_d_scores_[a] += static_cast<Real>(w * n[(t % b_count) * e_count + a % e_count]);
        }
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
        for (std::size_t a = 0; a < aux_d_scores_.size(); ++a)
          aux_d_scores_[a] += static_cast<Real>(w * n[a % e_count]);
      }
      out.aux_losses.push_back({type, value * per_token_factor_});
      kept[i] = std::move(n);
    }
  }

  RouterConfig cfg_;
  RouterConfig sinkhorn_cfg_;  // cfg_ with pre-softmax: the backward of Sinkhorn's softmax
  std::int64_t hidden_;
  std::uint64_t seed_ = 0;
  std::uint64_t layer_key_ = 0;
  Param<Real> weight_;
  std::vector<Real> expert_bias_;
  std::vector<std::int64_t> local_tokens_per_expert_;
  std::vector<double> global_counts_;
  std::int64_t global_steps_ = 0;
  std::map<int, Statistics> replay_;  // this step's train forwards, by microbatch
  // Saved by forward for backward.
  std::int64_t tokens_ = 0;
  int tp_cp_size_ = 1;
  bool has_aux_ = false, has_z_ = false;
  double per_token_factor_ = 1.0;
  JitterKey jitter_key_;
  std::vector<std::int64_t> jitter_tokens_;  // empty: no jitter in the last forward
  std::vector<Real> x_, logits_, aux_scores_, aux_d_scores_;
  std::vector<int> topk_;
};

}  // namespace v0
}  // namespace moefold
