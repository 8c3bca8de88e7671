#pragma once
/// \file
/// Router score functions as policy types (spec §2.2 step 4): `SoftmaxScore` (variants: top-k
/// on the logits then softmax over the K chosen, or softmax over all E then top-k, chosen by
/// `moe_router_pre_softmax`) and `SigmoidScore` (chosen scores normalized to sum 1 when K > 1),
/// and `ConfiguredScore`, which picks one of them from the configuration at run time. Each
/// gives, per token row (device-compatible, ops/router.hpp): the values top-k ranks, the
/// probabilities of the chosen experts, their backward, and the scores the load-balancing
/// losses use, with their backward. `router_rule(cfg)` turns a `RouterConfig` into the plain
/// values the row functions read.

#include <concepts>

#include "moefold/moe/router_config.hpp"
#include "moefold/ops/router.hpp"

namespace moefold {
inline namespace v0 {

/// The per-token rules of `cfg` as plain values (for the ops tier's bodies).
inline ops::RouterRule router_rule(RouterConfig const& cfg) {
  return ops::RouterRule{.experts = cfg.num_experts,
                         .topk = cfg.moe_router_topk,
                         .pre_softmax = cfg.moe_router_pre_softmax,
                         .sigmoid = cfg.moe_router_score_function == ScoreFunction::sigmoid,
                         .sinkhorn = cfg.sinkhorn(),
                         .num_groups = cfg.moe_router_num_groups,
                         .group_topk = cfg.moe_router_group_topk};
}

/// Softmax scores. Without `moe_router_pre_softmax`: top-k on the raw logits, then a softmax
/// over the K chosen logits. With it: softmax over all E, then top-k, no renormalization.
struct SoftmaxScore : ops::SoftmaxRow {
  static constexpr ScoreFunction kind = ScoreFunction::softmax;
  static constexpr bool accepts(ScoreFunction f) noexcept { return f == kind; }
};

/// Sigmoid scores: σ(logits); top-k on σ (+ expert bias, which selects but never weights); the
/// chosen scores divided by their sum (+1e-20) when K > 1.
struct SigmoidScore : ops::SigmoidRow {
  static constexpr ScoreFunction kind = ScoreFunction::sigmoid;
  static constexpr bool accepts(ScoreFunction f) noexcept { return f == kind; }
};

/// The score function the configuration names (`moe_router_score_function`), chosen at run
/// time: one router type for a trainer whose score function is a command-line choice. Each call
/// is `SoftmaxScore`'s or `SigmoidScore`'s.
struct ConfiguredScore : ops::ConfiguredRow {
  static constexpr bool accepts(ScoreFunction) noexcept { return true; }
};

/// A router score policy: which `moe_router_score_function` values it implements (`accepts`),
/// and per token row the selection values, the probabilities, their backward, and the scores
/// of the load-balancing losses with their backward.
template <class S>
concept RouterScore = requires {
  { S::accepts(ScoreFunction::softmax) } -> std::convertible_to<bool>;
}
&&requires(ops::RouterRule const& r, float const* l, int const* i, float* o) {
  S::selection_values(r, l, l, o);
  S::probs(r, l, i, o, o);
  S::backward(r, l, i, l, o, o);
  S::aux_scores(r, l, o);
  S::aux_scores_backward(r, l, l, l, o);
};

static_assert(RouterScore<SoftmaxScore> && RouterScore<SigmoidScore> &&
              RouterScore<ConfiguredScore>);

}  // namespace v0
}  // namespace moefold
