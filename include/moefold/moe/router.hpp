#pragma once
/// \file
/// `TopKRouter<Score, Real>`: Megatron's router (spec §2.2) — gating logits from a weight
/// `[E, H]`, score function and (group-limited) top-k, expert bias for aux-loss-free balancing,
/// load-balancing losses and z-loss, forward and backward. Token dropping is a dispatcher policy
/// (capacity.hpp): it is decided per source rank on the routing this router returns.
///
///   moefold::TopKRouter<moefold::SoftmaxScore> router(cfg, hidden);
///   auto out = router.forward(x, tokens, {.tp_cp = &groups.tp_cp()});   // out.routing, losses
///   auto dx = router.backward(d_probs);                                  // + router.weight_grad()

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/moe/aux_losses.hpp"
#include "moefold/moe/router_config.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/moe/score_functions.hpp"
#include "moefold/moe/top_k.hpp"
#include "moefold/nn/parameter.hpp"

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

/// The top-k router. Holds its weight `[E, H]`, the weight's gradient, the expert bias and the
/// expert-bias counters. One forward is followed by at most one backward.
template <RouterScore Score, class Real = float>
class TopKRouter {
 public:
  /// Throws `invalid_config` when `cfg` breaks a rule or names another score function.
  /// `weight_name` names the weight parameter (e.g. "layers.0.mlp.router.weight").
  TopKRouter(RouterConfig cfg, std::int64_t hidden_size, std::string weight_name = "router.weight")
      : cfg_(std::move(cfg)), hidden_(hidden_size) {
    cfg_.validate();
    if (cfg_.moe_router_score_function != Score::kind)
      throw invalid_config(fmt::format(
          "moe_router_score_function = {} does not match the router's score policy ({})",
          name(cfg_.moe_router_score_function), name(Score::kind)));
    if (hidden_size < 1) throw invalid_config(fmt::format("hidden size {} < 1", hidden_size));
    auto const e = static_cast<std::size_t>(cfg_.num_experts);
    // Replicated across TP under sequence parallelism: its gradient is also summed over tp.
    weight_ = Param<Real>::whole(std::move(weight_name), ParamClass::tp_replicated,
                                 cfg_.num_experts, hidden_size);
    if (cfg_.moe_router_enable_expert_bias) expert_bias_.assign(e, Real(0));
    local_tokens_per_expert_.assign(e, 0);
    global_counts_.assign(e, 0.0);
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
  /// Routed tokens per expert since the last bias update `[E]` (this router's top-k map).
  std::span<std::int64_t const> local_tokens_per_expert() const noexcept {
    return local_tokens_per_expert_;
  }

  /// Routes the `tokens` local tokens `x [T, H]` (`T = S_loc · micro_batch_size`, token
  /// `t = s·B + b`). Collective over `groups.tp_cp` when an aux/seq-aux loss is enabled and over
  /// `groups.tp_dp_cp` when the global aux loss is: every rank of those groups must call it.
  /// Throws for a wrong shape or a logit that is NaN or infinite.
  template <Communicator Comm>
  RouterOutput<Real> forward(std::span<Real const> x, std::int64_t tokens,
                             RouterGroups<Comm> groups, std::int64_t micro_batch_size = 1) {
    auto reduce = [](Comm* c, std::span<std::int64_t> v) {
      if (c) c->all_reduce(v, ReduceOp::sum);
    };
    return forward_impl(
        x, tokens, micro_batch_size, groups.tp_cp ? groups.tp_cp->size() : 1,
        groups.tp_dp_cp ? groups.tp_dp_cp->size() : 1,
        [&](std::span<std::int64_t> v) { reduce(groups.tp_cp, v); },
        [&](std::span<std::int64_t> v) { reduce(groups.tp_dp_cp, v); });
  }
  /// `forward` on one rank: every statistics group has one member.
  RouterOutput<Real> forward(std::span<Real const> x, std::int64_t tokens,
                             std::int64_t micro_batch_size = 1) {
    auto none = [](std::span<std::int64_t>) {};
    return forward_impl(x, tokens, micro_batch_size, 1, 1, none, none);
  }

  /// Backward of the last `forward`: `d_probs [T, E]` is the gradient of the loss with respect
  /// to `routing.probs` (entries outside the routing are ignored); the auxiliary losses and the
  /// z-loss enter with weight `aux_loss_scale` (Megatron's attached-loss scale, spec §2.2.1).
  /// Accumulates into `weight_grad()` and returns the gradient of the input `[T, H]`.
  std::vector<Real> backward(std::span<Real const> d_probs, double aux_loss_scale = 1.0) {
    auto const t_count = tokens_;
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const k_count = static_cast<std::size_t>(cfg_.moe_router_topk);
    MOEFOLD_EXPECTS(d_probs.size() == static_cast<std::size_t>(t_count) * e_count,
                    "TopKRouter::backward: d_probs has {} entries, expected T·E = {}·{}",
                    d_probs.size(), t_count, e_count);
    std::vector<Real> d_logits(logits_.size(), Real(0));
    std::vector<Real> scratch(2 * e_count), dk(k_count);
    Real const scale = cfg_.moe_router_topk_scaling_factor
                           ? static_cast<Real>(*cfg_.moe_router_topk_scaling_factor)
                           : Real(1);
    for (std::int64_t t = 0; t < t_count; ++t) {
      auto const row = static_cast<std::size_t>(t) * e_count;
      auto const idx =
          std::span<int const>(topk_).subspan(static_cast<std::size_t>(t) * k_count, k_count);
      for (std::size_t k = 0; k < k_count; ++k)
        dk[k] = scale * d_probs[row + static_cast<std::size_t>(idx[k])];
      auto lrow = std::span<Real const>(logits_).subspan(row, e_count);
      auto drow = std::span<Real>(d_logits).subspan(row, e_count);
      Score::template backward<Real>(cfg_, lrow, idx, dk, drow, scratch);
      if (has_aux_) {
        auto s = std::span<Real>(scratch).first(e_count);
        for (std::size_t e = 0; e < e_count; ++e)
          s[e] = static_cast<Real>(aux_loss_scale) * aux_d_scores_[row + e];
        Score::template aux_scores_backward<Real>(
            lrow, std::span<Real const>(aux_scores_).subspan(row, e_count), s, drow);
      }
    }
    if (cfg_.moe_z_loss_coeff)
      z_loss<Real>(logits_, t_count, cfg_.num_experts, *cfg_.moe_z_loss_coeff, tp_cp_size_,
                   d_logits, aux_loss_scale);
    auto const h = hidden_;
    auto const e = static_cast<std::int64_t>(e_count);
    // dW [E, H] += d_logitsᵀ [E, T] · x [T, H];  dx [T, H] = d_logits [T, E] · W [E, H].
    gemm<Real>(Trans::yes, Trans::no, e, h, t_count, Real(1), d_logits.data(), e, x_.data(), h,
               Real(1), weight_.grad.data(), h);
    std::vector<Real> dx(static_cast<std::size_t>(t_count * h), Real(0));
    gemm<Real>(Trans::no, Trans::no, t_count, h, e, Real(1), d_logits.data(), e, weight_.value.data(), h,
               Real(0), dx.data(), h);
    return dx;
  }

  /// Aux-loss-free balancing (spec §2.2.2), once per global batch: sums the counters over
  /// `tp_dp_cp` (null: one rank), then `bias_e += rate · sign(mean − count_e)`, then zeroes
  /// the counters. Collective over `tp_dp_cp`.
  template <Communicator Comm>
  void update_expert_bias(Comm* tp_dp_cp) {
    MOEFOLD_EXPECTS(cfg_.moe_router_enable_expert_bias,
                    "update_expert_bias needs moe_router_enable_expert_bias");
    if (tp_dp_cp) tp_dp_cp->all_reduce(std::span<std::int64_t>(local_tokens_per_expert_));
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
  /// Resets the running counts of `global_aux_loss` (once per global batch).
  void reset_global_aux_loss() {
    std::fill(global_counts_.begin(), global_counts_.end(), 0.0);
    global_steps_ = 0;
  }

 private:
  template <class ReduceTpCp, class ReduceTpDpCp>
  RouterOutput<Real> forward_impl(std::span<Real const> x, std::int64_t tokens,
                                  std::int64_t micro_batch, int tp_cp_size, int tp_dp_cp_size,
                                  ReduceTpCp&& reduce_tp_cp, ReduceTpDpCp&& reduce_tp_dp_cp) {
    auto const h = hidden_;
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const k_count = static_cast<std::size_t>(cfg_.moe_router_topk);
    auto const e = static_cast<std::int64_t>(e_count);
    MOEFOLD_EXPECTS(tokens >= 0 && x.size() == static_cast<std::size_t>(tokens * h),
                    "TopKRouter::forward: input has {} elements, expected T·H = {}·{}", x.size(),
                    tokens, h);
    MOEFOLD_EXPECTS(micro_batch >= 1 && tokens % micro_batch == 0,
                    "TopKRouter::forward: {} tokens are not a multiple of micro_batch_size {}",
                    tokens, micro_batch);
    tokens_ = tokens;
    tp_cp_size_ = tp_cp_size;
    x_.assign(x.begin(), x.end());
    logits_.assign(static_cast<std::size_t>(tokens) * e_count, Real(0));
    gemm<Real>(Trans::no, Trans::yes, tokens, e, h, Real(1), x.data(), h, weight_.value.data(), h,
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
    Real const scale = cfg_.moe_router_topk_scaling_factor
                           ? static_cast<Real>(*cfg_.moe_router_topk_scaling_factor)
                           : Real(1);
    for (std::int64_t t = 0; t < tokens; ++t) {
      auto const row = static_cast<std::size_t>(t) * e_count;
      auto lrow = std::span<Real const>(logits_).subspan(row, e_count);
      Score::template selection_values<Real>(cfg_, lrow, expert_bias_, sel);
      auto idx = std::span<int>(topk_).subspan(static_cast<std::size_t>(t) * k_count, k_count);
      if (cfg_.moe_router_num_groups > 0)
        group_limited_top_k<Real>(sel, cfg_.moe_router_num_groups, cfg_.moe_router_group_topk, idx,
                                  scratch);
      else
        top_k<Real>(sel, idx);
      Score::template probs<Real>(cfg_, lrow, idx, probs, scratch);
      for (std::size_t k = 0; k < k_count; ++k) {
        auto const at = row + static_cast<std::size_t>(idx[k]);
        out.routing.map[at] = Route::routed;
        out.routing.probs[at] = scale * probs[k];
        ++local_tokens_per_expert_[static_cast<std::size_t>(idx[k])];
      }
    }

    has_aux_ = false;
    for (std::size_t i = 0; i < cfg_.moe_router_load_balancing_type.size(); ++i)
      if (cfg_.moe_router_load_balancing_type[i] != LoadBalancingType::none &&
          cfg_.aux_loss_coeff(i) != 0.0)
        has_aux_ = true;
    if (has_aux_)
      aux_forward(out, tokens, micro_batch, tp_cp_size, tp_dp_cp_size, reduce_tp_cp,
                  reduce_tp_dp_cp);
    if (cfg_.moe_z_loss_coeff)
      out.z_loss = z_loss<Real>(logits_, tokens, e, *cfg_.moe_z_loss_coeff, tp_cp_size);
    return out;
  }

  /// The load-balancing losses and ∂(Σ losses)/∂scores, saved for backward.
  template <class ReduceTpCp, class ReduceTpDpCp>
  void aux_forward(RouterOutput<Real>& out, std::int64_t tokens, std::int64_t micro_batch,
                   int tp_cp_size, int tp_dp_cp_size, ReduceTpCp& reduce_tp_cp,
                   ReduceTpDpCp& reduce_tp_dp_cp) {
    auto const e_count = static_cast<std::size_t>(cfg_.num_experts);
    auto const k_count = static_cast<std::size_t>(cfg_.moe_router_topk);
    auto const e = static_cast<std::int64_t>(e_count);
    auto const b_count = static_cast<std::size_t>(micro_batch);
    aux_scores_.assign(logits_.size(), Real(0));
    aux_d_scores_.assign(logits_.size(), Real(0));
    // Scores over all E and a plain top-K map: no groups, no bias, no dropping.
    std::vector<int> idx(k_count);
    std::vector<std::int64_t> counts(e_count, 0), seq_counts(b_count * e_count, 0);
    std::vector<Real> sums(e_count, Real(0)), seq_sums(b_count * e_count, Real(0));
    for (std::int64_t t = 0; t < tokens; ++t) {
      auto const row = static_cast<std::size_t>(t) * e_count;
      auto s = std::span<Real>(aux_scores_).subspan(row, e_count);
      Score::template aux_scores<Real>(std::span<Real const>(logits_).subspan(row, e_count), s);
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
    int const k = cfg_.moe_router_topk;
    for (std::size_t i = 0; i < cfg_.moe_router_load_balancing_type.size(); ++i) {
      auto const type = cfg_.moe_router_load_balancing_type[i];
      double const coeff = cfg_.aux_loss_coeff(i);
      if (type == LoadBalancingType::none || coeff == 0.0) continue;
      double value = 0;
      if (type == LoadBalancingType::aux_loss) {
        std::vector<std::int64_t> n = counts;
        reduce_tp_cp(std::span<std::int64_t>(n));
        double const ttot = static_cast<double>(tokens) * tp_cp_size;
        value = switch_load_balancing_loss<Real, std::int64_t>(sums, n, e, k, ttot, coeff);
        double const w = switch_loss_weight(e, k, ttot, coeff);
        for (std::size_t a = 0; a < aux_d_scores_.size(); ++a)
          aux_d_scores_[a] += static_cast<Real>(w * static_cast<double>(n[a % e_count]));
      } else if (type == LoadBalancingType::seq_aux_loss) {
        std::vector<std::int64_t> n = seq_counts;
        reduce_tp_cp(std::span<std::int64_t>(n));
        double const ttot = static_cast<double>(tokens / micro_batch) * tp_cp_size;
        value = switch_load_balancing_loss<Real, std::int64_t>(seq_sums, n, e, k, ttot, coeff) /
                static_cast<double>(micro_batch);
        double const w = switch_loss_weight(e, k, ttot, coeff) / static_cast<double>(micro_batch);
        for (std::size_t a = 0; a < aux_d_scores_.size(); ++a) {
          auto const t = a / e_count;
          aux_d_scores_[a] +=
              static_cast<Real>(w * static_cast<double>(n[(t % b_count) * e_count + a % e_count]));
        }
      } else {  // global_aux_loss
        std::vector<std::int64_t> n = counts;
        reduce_tp_dp_cp(std::span<std::int64_t>(n));
        ++global_steps_;
        std::vector<double> avg(e_count);
        for (std::size_t c = 0; c < e_count; ++c) {
          global_counts_[c] += static_cast<double>(n[c]);
          avg[c] = global_counts_[c] / static_cast<double>(global_steps_);
        }
        double const ttot = static_cast<double>(tokens) * tp_dp_cp_size;
        value = switch_load_balancing_loss<Real, double>(sums, avg, e, k, ttot, coeff);
        double const w = switch_loss_weight(e, k, ttot, coeff);
        for (std::size_t a = 0; a < aux_d_scores_.size(); ++a)
          aux_d_scores_[a] += static_cast<Real>(w * avg[a % e_count]);
      }
      out.aux_losses.push_back({type, value});
    }
  }

  RouterConfig cfg_;
  std::int64_t hidden_;
  Param<Real> weight_;
  std::vector<Real> expert_bias_;
  std::vector<std::int64_t> local_tokens_per_expert_;
  std::vector<double> global_counts_;
  std::int64_t global_steps_ = 0;
  // Saved by forward for backward.
  std::int64_t tokens_ = 0;
  int tp_cp_size_ = 1;
  bool has_aux_ = false;
  std::vector<Real> x_, logits_, aux_scores_, aux_d_scores_;
  std::vector<int> topk_;
};

}  // namespace v0
}  // namespace moefold
