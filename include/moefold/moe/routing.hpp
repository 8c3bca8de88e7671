#pragma once
/// \file
/// `Routing`: which experts each local token goes to and with what probability — the router's
/// output and the dispatcher's input, in Megatron's dense layout (spec §2.1 step 3).

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {

/// Entry kinds of `Routing::map`.
enum class Route : std::uint8_t {
  none = 0,     ///< the token does not go to the expert
  routed = 1,   ///< chosen by the router (and kept)
  padding = 2,  ///< filler up to capacity (pad-to-capacity): moved, weighted by 0
};

/// The routing of `num_tokens` local tokens over `num_experts` experts: a dense map `[T, E]`
/// and probabilities `[T, E]` (zero where the map is `none`), both row-major, in the memory of
/// `Space` (the router's instance). It stays there: the dispatchers compute their row maps from
/// it with the instance, and only counts per expert cross to the host (docs/execution.md).
template <class Real, MemorySpace Space = HostSpace>
struct Routing {
  std::int64_t num_tokens = 0;
  std::int64_t num_experts = 0;
  Buffer<Route, Space> map;   ///< [T, E]
  Buffer<Real, Space> probs;  ///< [T, E]
  /// Device routings only: the router's finiteness check, left for the dispatcher's one copy
  /// of counts to the host — per token, the first expert whose logit is NaN or infinite, −1
  /// where all are finite `[T]`. Empty when the router checked already (host instances) or the
  /// routing came from elsewhere.
  Buffer<std::int64_t, Space> non_finite;

  /// An empty routing (every entry `none`, probabilities 0) of the given shape, in the memory of
  /// `exec`.
  template <ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  static Routing empty(Exec const& exec, std::int64_t tokens, std::int64_t experts) {
    MOEFOLD_EXPECTS(tokens >= 0 && experts >= 1,
                    "Routing: needs tokens ≥ 0 and experts ≥ 1 (got {} tokens, {} experts)", tokens,
                    experts);
    Routing r;
    r.num_tokens = tokens;
    r.num_experts = experts;
    r.map = exec.template allocate<Route>(tokens * experts);
    r.probs = exec.template allocate<Real>(tokens * experts);
    ops::fill(exec, r.map.view(), Route::none);
    ops::fill(exec, r.probs.view(), Real(0));
    return r;
  }
  /// `empty` in host memory.
  static Routing empty(std::int64_t tokens, std::int64_t experts)
    requires(Space::host_accessible)
  {
    return empty(Cpu{}, tokens, experts);
  }
  /// A copy in the memory of `exec` (same space).
  template <ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  Routing clone(Exec const& exec) const {
    Routing r;
    r.num_tokens = num_tokens;
    r.num_experts = num_experts;
    r.map = exec.template allocate<Route>(static_cast<std::int64_t>(map.size()));
    r.probs = exec.template allocate<Real>(static_cast<std::int64_t>(probs.size()));
    copy<Route>(exec, map.view(), r.map.view());
    copy<Real>(exec, probs.view(), r.probs.view());
    return r;
  }

  /// The routing that sends token t to experts `expert_ids[t·K + k]` with probabilities
  /// `probs[t·K + k]`. Throws when an id is outside [0, E), repeats within a token, or a prob is
  /// not finite, naming the token.
  static Routing from_top_k(std::int64_t tokens, std::int64_t experts, int k,
                            std::span<int const> expert_ids, std::span<Real const> top_probs)
    requires(Space::host_accessible)
  {
    Routing r = empty(tokens, experts);
    auto const n = static_cast<std::size_t>(tokens * k);
    MOEFOLD_EXPECTS(expert_ids.size() == n && top_probs.size() == n,
                    "Routing::from_top_k: {} tokens × top-{} need {} ids and probs (got {} and {})",
                    tokens, k, n, expert_ids.size(), top_probs.size());
    for (std::int64_t t = 0; t < tokens; ++t)
      for (int j = 0; j < k; ++j) {
        auto const i = static_cast<std::size_t>(t * k + j);
        int const e = expert_ids[i];
        MOEFOLD_EXPECTS(e >= 0 && e < experts,
                        "Routing: expert id {} of token {} is out of range [0, {})", e, t, experts);
        MOEFOLD_EXPECTS(std::isfinite(static_cast<double>(top_probs[i])),
                        "Routing: probability of token {} for expert {} is not finite", t, e);
        auto const at = static_cast<std::size_t>(t * experts + e);
        MOEFOLD_EXPECTS(r.map[at] == Route::none, "Routing: token {} chooses expert {} twice", t,
                        e);
        r.map[at] = Route::routed;
        r.probs[at] = top_probs[i];
      }
    return r;
  }

  /// Throws unless map and probs have `num_tokens · num_experts` entries.
  void check_shape(std::string_view who) const {
    // T·E only once T and E are in range (a lying shape could overflow the product).
    bool const shaped = num_tokens >= 0 && num_experts >= 1 &&
                        num_tokens <= std::numeric_limits<std::int64_t>::max() / num_experts;
    auto const n = shaped ? static_cast<std::size_t>(num_tokens * num_experts) : std::size_t{0};
    MOEFOLD_EXPECTS(shaped && map.size() == n && probs.size() == n,
                    "{}: routing of {} tokens × {} experts needs {} map and prob entries (got {} "
                    "and {})",
                    who, num_tokens, num_experts, n, map.size(), probs.size());
  }

  /// Entries per expert whose map is not `none` (what the dispatcher moves), `[E]` (host
  /// routings; the dispatchers count device routings with the instance).
  std::vector<std::int64_t> tokens_per_expert() const
    requires(Space::host_accessible)
  {
    std::vector<std::int64_t> n(static_cast<std::size_t>(num_experts), 0);
    for (std::size_t i = 0; i < map.size(); ++i)
      if (map[i] != Route::none) ++n[i % static_cast<std::size_t>(num_experts)];
    return n;
  }
};

}  // namespace v0
}  // namespace moefold
