#pragma once
/// \file
/// Expert capacity and the token-drop policies (spec §2.2 step 5): `Dropless`, `DropByProbs`,
/// `DropByPosition`, each (but the first) with optional pad-to-capacity. Capacity is decided
/// per source rank on its local tokens, as Megatron does (sub-sequence dropping), by the ops of
/// ops/capacity.hpp on the routing's instance.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>
#include <fmt/format.h>

#include "moefold/core/buffer.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/moe/router_config.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/ops/capacity.hpp"

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
  static constexpr ops::DropOrder order = ops::DropOrder::position;  ///< unused
  bool pad_to_capacity = false;  ///< always false
  std::optional<std::int64_t> capacity(std::int64_t, int, std::int64_t) const { return {}; }
};

/// Over-full experts keep the tokens with the highest probability (ties: lower token first).
struct DropByProbs {
  static constexpr bool drops = true;
  static constexpr ops::DropOrder order = ops::DropOrder::probs;
  double capacity_factor = 1.0;
  bool pad_to_capacity = false;  ///< pad every expert with prob-0 tokens up to capacity

  std::optional<std::int64_t> capacity(std::int64_t t, int k, std::int64_t e) const {
    return expert_capacity(t, k, e, capacity_factor);
  }
};

/// Over-full experts keep the earliest tokens routed to them (Megatron's intent; its topk tie
/// order is unspecified, ours is by position).
struct DropByPosition {
  static constexpr bool drops = true;
  static constexpr ops::DropOrder order = ops::DropOrder::position;
  double capacity_factor = 1.0;
  bool pad_to_capacity = false;

  std::optional<std::int64_t> capacity(std::int64_t t, int k, std::int64_t e) const {
    return expert_capacity(t, k, e, capacity_factor);
  }
};

/// A token-drop policy: whether it drops, its keep order, padding, and its capacity.
template <class P>
concept DropPolicy = requires(P const& p) {
  { P::drops } -> std::convertible_to<bool>;
  { P::order } -> std::convertible_to<ops::DropOrder>;
  { p.pad_to_capacity } -> std::convertible_to<bool>;
  { p.capacity(std::int64_t{}, 1, std::int64_t{}) } -> std::same_as<std::optional<std::int64_t>>;
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

/// Applies `policy` to the local routing `r` in place (spec §2.2 step 5), with the instance
/// that holds it: with capacity C ≤ T, each expert keeps C entries in the policy's order;
/// without padding, dropped entries become `none` with prob 0; with padding, every expert gets
/// exactly C entries, the fillers as `padding` with prob 0. With C > T nothing is dropped
/// (padding then requires C ≤ T: throws). `workspace` holds the rankings (reused across
/// calls). Returns the capacity (none when dropless). Only host metadata (shapes, C) decides
/// anything on the host.
template <DropPolicy Policy, ExecutionInstance Exec, class Real>
std::optional<std::int64_t> apply_capacity(
    Exec const& exec, Policy const& policy, Routing<Real, typename Exec::memory_space>& r, int topk,
    Buffer<std::int64_t, typename Exec::memory_space>& workspace) {
  r.check_shape("apply_capacity");
  auto const cap = policy.capacity(r.num_tokens, topk, r.num_experts);
  if (!cap) return cap;
  auto const c = *cap;
  if (c > r.num_tokens) {
    MOEFOLD_EXPECTS(!policy.pad_to_capacity,
                    "pad-to-capacity needs capacity C = {} ≤ local tokens T = {}", c, r.num_tokens);
    return cap;
  }
  auto const n = r.num_tokens * r.num_experts;
  auto const words = n + ops::rank_columns_scratch(Policy::order, r.num_tokens, r.num_experts);
  if (static_cast<std::int64_t>(workspace.size()) < words)
    workspace = exec.template allocate<std::int64_t>(words);
  using Space = typename Exec::memory_space;
  View<std::int64_t, Space> const all = workspace.view();
  auto const rank = all.cols(0, n);
  ops::rank_columns<Exec, Route, Real>(exec, Policy::order,
                                       View<Route const, Space>(r.map.view(r.num_tokens, r.num_experts)),
                                       Route::none, View<Real const, Space>(r.probs.view()), rank,
                                       all.cols(n, words - n));
  ops::apply_capacity<Exec, Route, Real>(exec, View<std::int64_t const, Space>(rank), c,
                                         policy.pad_to_capacity, Route::none, Route::padding,
                                         r.map.view(), r.probs.view());
  return cap;
}
/// `apply_capacity` on a host routing with a temporary workspace.
template <DropPolicy Policy, class Real>
std::optional<std::int64_t> apply_capacity(Policy const& policy, Routing<Real>& r, int topk) {
  Buffer<std::int64_t> workspace;
  return apply_capacity(Cpu{}, policy, r, topk, workspace);
}

}  // namespace v0
}  // namespace moefold
