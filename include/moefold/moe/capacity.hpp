#pragma once
/// \file
/// Expert capacity and the token-drop policies (spec §2.2 step 5): `Dropless`, `DropByProbs`,
/// `DropByPosition`, each (but the first) with optional pad-to-capacity. Capacity is decided
/// per source rank on its local tokens, as Megatron does (sub-sequence dropping).

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>
#include <fmt/format.h>

#include "moefold/moe/router_config.hpp"
#include "moefold/moe/routing.hpp"

namespace moefold {
inline namespace v0 {

/// Megatron's capacity, the one place of the formula: `C = ceil((T·K/E) · capacity_factor)`.
inline std::int64_t expert_capacity(std::int64_t num_tokens, int topk, std::int64_t num_experts,
                                    double capacity_factor) {
  MOEFOLD_EXPECTS(capacity_factor > 0, "capacity factor must be positive (got {})",
                  capacity_factor);
  double const c = std::ceil(static_cast<double>(num_tokens * topk) /
                             static_cast<double>(num_experts) * capacity_factor);
  return static_cast<std::int64_t>(c);
}

/// No token is ever dropped; every expert takes all tokens routed to it.
struct Dropless {
  static constexpr bool drops = false;
  bool pad_to_capacity = false;  ///< always false
  std::optional<std::int64_t> capacity(std::int64_t, int, std::int64_t) const { return {}; }
  template <class Real>
  void keep_order(Routing<Real> const&, std::int64_t, std::vector<std::int32_t>&) const {}
};

/// Over-full experts keep the tokens with the highest probability (ties: lower token first).
struct DropByProbs {
  static constexpr bool drops = true;
  double capacity_factor = 1.0;
  bool pad_to_capacity = false;  ///< pad every expert with prob-0 tokens up to capacity

  std::optional<std::int64_t> capacity(std::int64_t t, int k, std::int64_t e) const {
    return expert_capacity(t, k, e, capacity_factor);
  }
  /// The tokens of column `e`, best first (routed tokens by prob, then the others).
  template <class Real>
  void keep_order(Routing<Real> const& r, std::int64_t e, std::vector<std::int32_t>& order) const {
    order.resize(static_cast<std::size_t>(r.num_tokens));
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](std::int32_t t) {
      auto const i = static_cast<std::size_t>(t * r.num_experts + e);
      return std::pair<bool, Real>(r.map[i] != Route::none, r.probs[i]);
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t a, std::int32_t b) { return key(a) > key(b); });
  }
};

/// Over-full experts keep the earliest tokens routed to them (Megatron's intent; its topk tie
/// order is unspecified, ours is by position).
struct DropByPosition {
  static constexpr bool drops = true;
  double capacity_factor = 1.0;
  bool pad_to_capacity = false;

  std::optional<std::int64_t> capacity(std::int64_t t, int k, std::int64_t e) const {
    return expert_capacity(t, k, e, capacity_factor);
  }
  template <class Real>
  void keep_order(Routing<Real> const& r, std::int64_t e, std::vector<std::int32_t>& order) const {
    order.clear();
    for (std::int64_t t = 0; t < r.num_tokens; ++t)
      if (r.map[static_cast<std::size_t>(t * r.num_experts + e)] != Route::none)
        order.push_back(static_cast<std::int32_t>(t));
    for (std::int64_t t = 0; t < r.num_tokens; ++t)
      if (r.map[static_cast<std::size_t>(t * r.num_experts + e)] == Route::none)
        order.push_back(static_cast<std::int32_t>(t));
  }
};

/// A token-drop policy.
template <class P>
concept DropPolicy = requires(P const& p, Routing<float> const& r, std::vector<std::int32_t>& o) {
  { P::drops } -> std::convertible_to<bool>;
  { p.pad_to_capacity } -> std::convertible_to<bool>;
  { p.capacity(std::int64_t{}, 1, std::int64_t{}) } -> std::same_as<std::optional<std::int64_t>>;
  p.keep_order(r, std::int64_t{}, o);
};
static_assert(DropPolicy<Dropless> && DropPolicy<DropByProbs> && DropPolicy<DropByPosition>);

/// The drop policy `cfg` asks for, as `Policy` (which must match `cfg`'s policy; throws
/// `invalid_config` otherwise).
template <DropPolicy Policy>
Policy drop_policy_from(RouterConfig const& cfg) {
  if constexpr (std::is_same_v<Policy, Dropless>) {
    if (cfg.moe_expert_capacity_factor)
      throw invalid_config("Dropless dispatch with moe_expert_capacity_factor set");
    return {};
  } else {
    if (!cfg.moe_expert_capacity_factor)
      throw invalid_config("a token-dropping policy needs moe_expert_capacity_factor");
    bool const by_probs = std::is_same_v<Policy, DropByProbs>;
    if (by_probs != (cfg.moe_token_drop_policy == TokenDropPolicy::probs))
      throw invalid_config(
          fmt::format("the drop policy type does not match "
                      "moe_token_drop_policy = {}",
                      by_probs ? "position" : "probs"));
    return Policy{*cfg.moe_expert_capacity_factor, cfg.moe_pad_expert_input_to_capacity};
  }
}

/// Applies `policy` to the local routing `r` in place (spec §2.2 step 5): with capacity C ≤ T,
/// each expert keeps C entries in the policy's order; without padding, dropped entries become
/// `none` with prob 0; with padding, every expert gets exactly C entries, the fillers as
/// `padding` with prob 0. With C > T nothing is dropped (padding then requires C ≤ T: throws).
/// Returns the capacity (none when dropless).
template <DropPolicy Policy, class Real>
std::optional<std::int64_t> apply_capacity(Policy const& policy, Routing<Real>& r, int topk) {
  r.check_shape("apply_capacity");
  auto const cap = policy.capacity(r.num_tokens, topk, r.num_experts);
  if (!cap) return cap;
  auto const c = *cap;
  if (c > r.num_tokens) {
    MOEFOLD_EXPECTS(!policy.pad_to_capacity,
                    "pad-to-capacity needs capacity C = {} ≤ local tokens T = {}", c, r.num_tokens);
    return cap;
  }
  std::vector<std::int32_t> order;
  std::vector<Route> const original = r.map;
  for (std::int64_t e = 0; e < r.num_experts; ++e) {
    policy.keep_order(r, e, order);
    for (std::size_t rank = 0; rank < order.size(); ++rank) {
      auto const i = static_cast<std::size_t>(order[rank] * r.num_experts + e);
      bool const keep = static_cast<std::int64_t>(rank) < c;
      if (!keep) {
        r.map[i] = Route::none;
        r.probs[i] = Real(0);
      } else if (original[i] == Route::none) {
        r.map[i] = policy.pad_to_capacity ? Route::padding : Route::none;
        r.probs[i] = Real(0);
      }
    }
  }
  return cap;
}

}  // namespace v0
}  // namespace moefold
