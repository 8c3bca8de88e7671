#pragma once
/// \file
/// `RouterConfig`: the run-time choices of the MoE router, with Megatron-Core's names
/// (spec §2.2), and `validate`, which enforces Megatron's configuration rules.

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>
#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// `moe_router_score_function`.
enum class ScoreFunction : std::uint8_t { softmax, sigmoid };
/// `moe_router_dtype`: the type of the router's logits and score computation when it is not the
/// input's (Megatron's choices; unset means the input dtype).
enum class RouterDtype : std::uint8_t { fp32, fp64 };
/// `moe_token_drop_policy`: which tokens an over-full expert keeps.
enum class TokenDropPolicy : std::uint8_t { probs, position };
/// `moe_router_load_balancing_type` (several may be enabled at once).
/// `sinkhorn` is a routing type of its own (S-BASE): it must be the only type, with coefficient 0.
enum class LoadBalancingType : std::uint8_t {
  none,
  aux_loss,
  seq_aux_loss,
  global_aux_loss,
  sinkhorn
};

constexpr std::string_view name(ScoreFunction s) noexcept {
  return s == ScoreFunction::softmax ? "softmax" : "sigmoid";
}
constexpr std::string_view name(RouterDtype d) noexcept {
  return d == RouterDtype::fp32 ? "fp32" : "fp64";
}
constexpr std::string_view name(LoadBalancingType t) noexcept {
  switch (t) {
    case LoadBalancingType::none:
      return "none";
    case LoadBalancingType::aux_loss:
      return "aux_loss";
    case LoadBalancingType::seq_aux_loss:
      return "seq_aux_loss";
    case LoadBalancingType::global_aux_loss:
      return "global_aux_loss";
    case LoadBalancingType::sinkhorn:
      return "sinkhorn";
  }
  return "?";
}

/// The router's configuration. Field names are Megatron's `TransformerConfig` names.
struct RouterConfig {
  int num_experts = 8;      ///< E (`num_moe_experts`)
  int moe_router_topk = 2;  ///< K
  ScoreFunction moe_router_score_function = ScoreFunction::softmax;
  bool moe_router_pre_softmax = false;  ///< softmax over all E before the top-k
  int moe_router_num_groups = 0;        ///< G for group-limited top-k (0: off)
  int moe_router_group_topk = 0;        ///< groups kept by group-limited top-k
  std::optional<double> moe_router_topk_scaling_factor =
      std::nullopt;  ///< multiplies the final probs
  /// The router's logits and scores in FP32 or FP64; unset: in the input dtype (a bf16 layer's
  /// router then stores its logits rounded to bf16, as a bf16 GEMM with FP32 accumulation
  /// does). `TopKRouter<Exec, Score, Real>` computes in `Real`, which must be the named type.
  std::optional<RouterDtype> moe_router_dtype = std::nullopt;
  /// Enabled load-balancing losses; each has the coefficient of the same index in
  /// `moe_aux_loss_coeff` (or the single coefficient given).
  std::vector<LoadBalancingType> moe_router_load_balancing_type = {LoadBalancingType::aux_loss};
  std::vector<double> moe_aux_loss_coeff = {0.0};
  std::optional<double> moe_z_loss_coeff = std::nullopt;  ///< z-loss coefficient (unset: no z-loss)
  /// Capacity factor; unset means dropless. Consumed by the drop policies (capacity.hpp).
  std::optional<double> moe_expert_capacity_factor = std::nullopt;
  TokenDropPolicy moe_token_drop_policy = TokenDropPolicy::probs;
  bool moe_pad_expert_input_to_capacity = false;
  bool moe_router_enable_expert_bias = false;  ///< aux-loss-free balancing (sigmoid only)
  double moe_router_bias_update_rate = 1e-3;
  /// Multiplies the router's input by noise uniform in [1 − eps, 1 + eps] in training forwards
  /// (a deterministic function of seed, step, layer, global token and feature; input_jitter.hpp).
  std::optional<double> moe_input_jitter_eps = std::nullopt;
  /// Megatron's `calculate_per_token_loss`: the attached auxiliary losses (and the z-loss) are
  /// multiplied by this rank's tokens · |tp_cp| (spec §2.2 step 6), to be divided by the global
  /// token count in the step finalizer.
  bool calculate_per_token_loss = false;

  /// True when the routing is Sinkhorn's (`moe_router_load_balancing_type = sinkhorn`).
  bool sinkhorn() const noexcept {
    return moe_router_load_balancing_type.size() == 1 &&
           moe_router_load_balancing_type[0] == LoadBalancingType::sinkhorn;
  }

  /// The coefficient of load-balancing loss number `i`.
  double aux_loss_coeff(std::size_t i) const {
    return moe_aux_loss_coeff.size() == 1 ? moe_aux_loss_coeff[0] : moe_aux_loss_coeff.at(i);
  }

  /// Throws `invalid_config` naming the rule and the numbers when the configuration breaks one
  /// of Megatron's rules.
  void validate() const;

 private:
  template <class... A>
  [[noreturn]] static void fail(fmt::format_string<A...> f, A&&... a) {
    throw invalid_config(fmt::format(f, std::forward<A>(a)...));
  }
};

inline void RouterConfig::validate() const {
  if (num_experts < 1) fail("num_experts must be at least 1 (got {})", num_experts);
  if (moe_router_topk < 1 || moe_router_topk > num_experts)
    fail("moe_router_topk ({}) must be in [1, num_experts = {}]", moe_router_topk, num_experts);
  if (moe_router_score_function == ScoreFunction::softmax && moe_router_topk == 1 &&
      !moe_router_pre_softmax && !sinkhorn())
    fail("moe_router_topk = 1 with the softmax score function requires moe_router_pre_softmax");
  if (moe_router_num_groups != 0) {
    if (moe_router_num_groups < 1 || num_experts % moe_router_num_groups != 0)
      fail("num_experts ({}) must be divisible by moe_router_num_groups ({})", num_experts,
           moe_router_num_groups);
    if (moe_router_group_topk < 1 || moe_router_group_topk > moe_router_num_groups)
      fail("moe_router_group_topk ({}) must be in [1, moe_router_num_groups = {}]",
           moe_router_group_topk, moe_router_num_groups);
    if (moe_router_topk / moe_router_group_topk < 1 ||
        moe_router_topk / moe_router_group_topk > num_experts / moe_router_num_groups)
      fail(
          "moe_router_topk / moe_router_group_topk ({} / {}) must be in [1, experts per group "
          "= {}]",
          moe_router_topk, moe_router_group_topk, num_experts / moe_router_num_groups);
    if (moe_router_topk > moe_router_group_topk * (num_experts / moe_router_num_groups))
      fail("moe_router_topk ({}) exceeds the experts of the kept groups ({} · {})", moe_router_topk,
           moe_router_group_topk, num_experts / moe_router_num_groups);
  }
  if (moe_router_enable_expert_bias && moe_router_score_function != ScoreFunction::sigmoid)
    fail("moe_router_enable_expert_bias requires the sigmoid score function (got {})",
         name(moe_router_score_function));
  if (moe_aux_loss_coeff.size() != 1 &&
      moe_aux_loss_coeff.size() != moe_router_load_balancing_type.size())
    fail("moe_aux_loss_coeff has {} entries but {} load-balancing types are enabled",
         moe_aux_loss_coeff.size(), moe_router_load_balancing_type.size());
  for (std::size_t i = 0; i < moe_router_load_balancing_type.size(); ++i) {
    if (moe_router_load_balancing_type[i] != LoadBalancingType::sinkhorn) continue;
    if (moe_router_load_balancing_type.size() != 1)
      fail(
          "moe_router_load_balancing_type sinkhorn is a routing type and must be the only one "
          "(got {} types)",
          moe_router_load_balancing_type.size());
    if (aux_loss_coeff(0) != 0.0)
      fail("Sinkhorn routing does not support an aux loss: moe_aux_loss_coeff must be 0 (got {})",
           aux_loss_coeff(0));
    if (moe_router_num_groups != 0 || moe_router_enable_expert_bias)
      fail("Sinkhorn routing takes no group-limited top-k and no expert bias");
    if (moe_expert_capacity_factor)
      fail(
          "moe_expert_capacity_factor needs the aux_loss, seq_aux_loss, global_aux_loss or none "
          "load-balancing type (got sinkhorn)");
  }
  for (std::size_t i = 0; i < moe_aux_loss_coeff.size(); ++i)
    if (!(moe_aux_loss_coeff[i] >= 0))
      fail("moe_aux_loss_coeff[{}] must be ≥ 0 (got {})", i, moe_aux_loss_coeff[i]);
  if (moe_z_loss_coeff && !(*moe_z_loss_coeff >= 0))
    fail("moe_z_loss_coeff must be ≥ 0 (got {})", *moe_z_loss_coeff);
  if (moe_input_jitter_eps && !(*moe_input_jitter_eps >= 0 && *moe_input_jitter_eps < 1))
    fail("moe_input_jitter_eps must be in [0, 1) (got {})", *moe_input_jitter_eps);
  if (moe_router_enable_expert_bias && !(moe_router_bias_update_rate >= 0))
    fail("moe_router_bias_update_rate must be ≥ 0 (got {})", moe_router_bias_update_rate);
  if (moe_expert_capacity_factor) {
    if (!(*moe_expert_capacity_factor > 0))
      fail("moe_expert_capacity_factor must be positive (got {})", *moe_expert_capacity_factor);
  } else if (moe_pad_expert_input_to_capacity) {
    fail("moe_pad_expert_input_to_capacity requires moe_expert_capacity_factor");
  }
}

}  // namespace v0
}  // namespace moefold
