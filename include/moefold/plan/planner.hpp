#pragma once
/// \file
/// The folding planner: enumerates every valid configuration (TP, CP, PP, VPP, EP, ETP,
/// micro-batch size, recompute) of a model on N GPUs, prices each with the cost model and ranks
/// those that fit in memory by predicted throughput. Also reports the best configuration that
/// obeys the pre-folding rule (ETP = TP and EP divides DP·CP), for comparison.

#include <algorithm>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/plan/cost_model.hpp"

namespace moefold {
inline namespace v0 {

/// What to plan: a model on a cluster for a workload.
struct PlanRequest {
  ModelSpec model{};
  ClusterSpec cluster{};
  Workload workload{};
  CostConstants constants{};
  int max_micro_batch_size = 8;  ///< largest micro-batch size tried
  /// Keep only the best (VPP, micro-batch size, recompute) of each parallel mapping
  /// (TP, CP, PP, EP, ETP) in the ranking; false ranks every variant.
  bool best_per_mapping = true;
  /// Most cost-model evaluations one `plan()` may spend; past it the planner stops with an
  /// error instead of running for hours (a search is normally a few thousand to a few 10⁵).
  long max_evaluations = 10'000'000;
};

/// The planner's answer.
struct PlanResult {
  std::vector<Estimate> ranked;           ///< configurations that fit, best first
  std::optional<Estimate> best_unfolded;  ///< the best that obeys the pre-folding rule
  long mappings = 0;                      ///< valid (TP, CP, PP, EP, ETP) foldings enumerated
  long configurations = 0;                ///< configurations priced (all knobs)
  long fitting = 0;                       ///< of which fit in memory
  /// Calls to the cost model: every priced configuration plus every memory lower bound taken to
  /// prune a mapping before pricing it. The planner's work is proportional to this (placement
  /// is cached per attention and per MoE layout), so tests bound it instead of timing it.
  long evaluations = 0;
  long pruned_by_memory = 0;  ///< mappings skipped because even their weights do not fit
  /// Layouts whose group placement was computed (the only work that grows with the GPU count):
  /// one per distinct attention layout (TP, CP, PP) and MoE layout (PP, EP, ETP).
  long layouts_placed = 0;
};

/// The parallel mapping of a configuration, without the schedule knobs.
struct Mapping {
  int tp = 1, cp = 1, pp = 1, ep = 1, etp = 1;
  bool operator==(Mapping const&) const = default;
};

/// The mapping of `c`.
constexpr Mapping mapping_of(ParallelConfig const& c) noexcept {
  return {.tp = c.tp, .cp = c.cp, .pp = c.pp, .ep = c.ep, .etp = c.etp};
}

namespace detail {

/// The divisors of `n` ≥ 1, ascending, in O(√n).
inline std::vector<int> divisors(long n) {
  std::vector<int> low, high;
  for (long d = 1; d * d <= n; ++d) {
    if (n % d != 0) continue;
    low.push_back(static_cast<int>(d));
    if (d != n / d) high.push_back(static_cast<int>(n / d));
  }
  low.insert(low.end(), high.rbegin(), high.rend());
  return low;
}

/// Strict "better than": higher throughput, then less memory, then smaller sizes (determinism).
inline bool better(Estimate const& x, Estimate const& y) {
  if (x.step_time_s != y.step_time_s) return x.step_time_s < y.step_time_s;
  if (x.memory.total() != y.memory.total()) return x.memory.total() < y.memory.total();
  auto key = [](ParallelConfig const& c) {
    return std::make_tuple(c.tp, c.cp, c.pp, c.vpp, c.ep, c.etp, c.micro_batch_size,
                           static_cast<int>(c.recompute));
  };
  return key(x.config) < key(y.config);
}

/// Prices every schedule variant (VPP, micro-batch size, recompute) of one mapping; calls
/// `keep` with each estimate that fits. Returns the number priced.
template <class Keep>
long price_variants(PlanRequest const& r, Mapping const& m, FoldingPlacement const& place,
                    Keep&& keep) {
  long priced = 0;
  int const layers_per_stage = r.model.num_layers / m.pp;
  for (int vpp : divisors(layers_per_stage)) {
    if (vpp > 1 && m.pp == 1) break;
    for (int mbs = 1; mbs <= r.max_micro_batch_size; ++mbs) {
      for (Recompute rc : {Recompute::none, Recompute::full}) {
        ParallelConfig const c{.tp = m.tp,
                               .cp = m.cp,
                               .pp = m.pp,
                               .vpp = vpp,
                               .ep = m.ep,
                               .etp = m.etp,
                               .micro_batch_size = mbs,
                               .recompute = rc};
        if (shape_violation(r.model, r.workload, c)) break;
        ++priced;
        Estimate e = estimate(r.model, r.cluster, r.workload, c, place, r.constants);
        if (e.fits) {
          keep(std::move(e));
          break;  // recompute only when keeping everything does not fit
        }
      }
    }
  }
  return priced;
}

inline void validate(PlanRequest const& r) {
  r.model.validate();
  r.cluster.validate();
  r.workload.state.validate();
  if (r.workload.gpus < 1)
    throw invalid_config(fmt::format("--gpus must be at least 1 (got {})", r.workload.gpus));
  constexpr long kMaxInt = std::numeric_limits<int>::max();
  if (r.workload.global_batch_size < 1 || r.workload.global_batch_size > kMaxInt)
    throw invalid_config(fmt::format("global batch size must be between 1 and {} (got {})", kMaxInt,
                                     r.workload.global_batch_size));
  if (r.workload.seq_length < 1 || r.workload.seq_length > kMaxInt)
    throw invalid_config(fmt::format("sequence length must be between 1 and {} (got {})", kMaxInt,
                                     r.workload.seq_length));
  if (r.max_micro_batch_size < 1 || r.max_micro_batch_size > 1024)
    throw invalid_config(fmt::format("max micro-batch size must be between 1 and 1024 (got {})",
                                     r.max_micro_batch_size));
}

/// The largest TP·CP the model's attention can be split over: TP divides the heads, the KV
/// groups and the shared-expert width; the sequence is cut into TP·CP (·2 with CP) equal parts.
inline long max_tp_cp(ModelSpec const& model, long seq_length) {
  long best = 1;
  int const shared = model.shared_expert_ffn_hidden_size;
  for (int tp : divisors(std::gcd(model.num_attention_heads, model.num_query_groups))) {
    if ((shared != 0 && shared % tp != 0) || seq_length % tp != 0) continue;
    long const rest = seq_length / tp;
    best = std::max(best, tp * (rest % 2 == 0 ? std::max(1L, rest / 2) : 1L));
  }
  return best;
}

}  // namespace detail

/// The most GPUs that can run `model` on `w` with every GPU doing distinct work: attention
/// (TP·CP by the heads and the sequence) × PP (at most the layers) × DP (at most the global batch,
/// with micro-batches of one sequence). Any larger count has no valid folding.
inline long max_useful_gpus(ModelSpec const& model, Workload const& w) {
  // Three factors below 2³¹ each: compute in long double and saturate.
  long double const n = static_cast<long double>(detail::max_tp_cp(model, w.seq_length)) *
                        model.num_layers * static_cast<long double>(w.global_batch_size);
  constexpr long kMax = std::numeric_limits<long>::max();
  return n >= static_cast<long double>(kMax) ? kMax : static_cast<long>(n);
}

/// Why `w.gpus` is more than `model` can use (see `max_useful_gpus`), or nullopt.
inline std::optional<std::string> too_many_gpus(ModelSpec const& model, Workload const& w) {
  long const limit = max_useful_gpus(model, w);
  if (w.gpus <= limit) return std::nullopt;
  return fmt::format(
      "--gpus {}: at most {} GPUs can hold model '{}' usefully: TP·CP ≤ {} (TP divides "
      "num_attention_heads {} and num_query_groups {}; CP cuts the {} tokens of a sequence into "
      "2·CP chunks), PP ≤ num_layers {}, DP ≤ global batch {} (micro-batch 1)",
      w.gpus, limit, model.name, detail::max_tp_cp(model, w.seq_length), model.num_attention_heads,
      model.num_query_groups, w.seq_length, model.num_layers, w.global_batch_size);
}

/// The best configuration (over VPP, micro-batch size and recompute) of mapping `m`, or nullopt
/// when no variant fits in memory. Throws `invalid_config` when `m` is not a valid folding of
/// the workload's GPUs.
inline std::optional<Estimate> best_for_mapping(PlanRequest const& r, Mapping const& m) {
  detail::validate(r);
  FoldedMapping const fold =
      folding_of(r.workload, {.tp = m.tp, .cp = m.cp, .pp = m.pp, .ep = m.ep, .etp = m.etp});
  check_shape(r.model, r.workload, {.tp = m.tp, .cp = m.cp, .pp = m.pp, .ep = m.ep, .etp = m.etp});
  std::optional<Estimate> best;
  detail::price_variants(r, m, place(fold, r.cluster.gpus_per_node), [&](Estimate&& e) {
    if (!best || detail::better(e, *best)) best = std::move(e);
  });
  return best;
}

/// Enumerates every valid configuration for `r.workload.gpus` GPUs and ranks those that fit.
/// Throws `invalid_config` for an invalid request (model, cluster, workload), for more GPUs than
/// the model can use (`too_many_gpus`) and when the search would exceed `r.max_evaluations`.
///
/// Only sizes that can be valid are generated: TP from the divisors of the heads and KV groups,
/// PP from those of the layers, DP from those of the global batch (CP = W/(TP·PP·DP)), EP from
/// those of the experts, ETP from those of the expert width; a mapping whose weights, gradients
/// and optimizer state alone exceed the HBM is dropped before any variant is priced; group
/// placements are computed once per attention layout (TP, CP, PP) and per MoE layout
/// (PP, EP, ETP).
inline PlanResult plan(PlanRequest const& r) {
  detail::validate(r);
  if (auto why = too_many_gpus(r.model, r.workload)) throw invalid_config(*why);
  PlanResult out;
  ModelSpec const& model = r.model;
  long const W = r.workload.gpus;
  int const shared = model.shared_expert_ffn_hidden_size;
  std::map<std::tuple<int, int, int>, FoldingPlacement> attention_at, moe_at;
  auto const layer_divisors = detail::divisors(model.num_layers);
  auto const batch_divisors = detail::divisors(r.workload.global_batch_size);
  auto const expert_divisors = detail::divisors(model.num_experts);
  auto const width_divisors = detail::divisors(model.moe_ffn_hidden_size);
  for (int tp : detail::divisors(std::gcd(model.num_attention_heads, model.num_query_groups))) {
    if (W % tp != 0 || (shared != 0 && shared % tp != 0)) continue;
    for (int pp : layer_divisors) {
      if ((W / tp) % pp != 0) continue;
      for (int dp : batch_divisors) {
        long const tp_pp_dp = long{tp} * pp * dp;
        if (W % tp_pp_dp != 0) continue;
        int const cp = static_cast<int>(W / tp_pp_dp);
        for (int ep : expert_divisors) {
          if ((W / pp) % ep != 0) continue;
          for (int etp : width_divisors) {
            if ((W / pp / ep) % etp != 0) continue;
            Mapping const m{.tp = tp, .cp = cp, .pp = pp, .ep = ep, .etp = etp};
            ParallelConfig const base{.tp = tp, .cp = cp, .pp = pp, .ep = ep, .etp = etp};
            if (detail::shape_violation(model, r.workload, base)) continue;
            ++out.mappings;
            // Memory lower bound: state alone (no activations) must fit.
            ++out.evaluations;
            double const floor = detail::state_memory(model, r.workload, base, r.constants).total();
            if (floor > 1e9 * r.cluster.hbm_gb) {
              ++out.pruned_by_memory;
              continue;
            }
            auto attention = attention_at.find({tp, cp, pp});
            auto moe = moe_at.find({pp, ep, etp});
            if (attention == attention_at.end() || moe == moe_at.end()) {
              FoldedMapping const fold = folding_of(r.workload, base);
              if (attention == attention_at.end()) {
                attention = attention_at.emplace(std::tuple{tp, cp, pp}, FoldingPlacement{}).first;
                place_attention(attention->second, fold, r.cluster.gpus_per_node);
                ++out.layouts_placed;
              }
              if (moe == moe_at.end()) {
                moe = moe_at.emplace(std::tuple{pp, ep, etp}, FoldingPlacement{}).first;
                place_moe(moe->second, fold, r.cluster.gpus_per_node);
                ++out.layouts_placed;
              }
            }
            FoldingPlacement placement = attention->second;
            placement.ep = moe->second.ep;
            placement.etp = moe->second.etp;
            placement.edp = moe->second.edp;
            std::optional<Estimate> best;
            long const priced = detail::price_variants(r, m, placement, [&](Estimate&& e) {
              ++out.fitting;
              if (!e.folded && (!out.best_unfolded || detail::better(e, *out.best_unfolded)))
                out.best_unfolded = e;
              if (!r.best_per_mapping) {
                out.ranked.push_back(std::move(e));
              } else if (!best || detail::better(e, *best)) {
                best = std::move(e);
              }
            });
            out.configurations += priced;
            out.evaluations += priced;
            if (best) out.ranked.push_back(std::move(*best));
            if (out.evaluations > r.max_evaluations)
              throw invalid_config(fmt::format(
                  "the search for {} GPUs exceeds {} cost-model evaluations after {} mappings; "
                  "narrow it (fewer GPUs, or price one folding with --explain)",
                  W, r.max_evaluations, out.mappings));
          }
        }
      }
    }
  }
  std::sort(out.ranked.begin(), out.ranked.end(), detail::better);
  return out;
}

/// The 0-based position of mapping `m` in `result.ranked`, or nullopt when it is not there.
inline std::optional<int> rank_of(PlanResult const& result, Mapping const& m) {
  for (std::size_t i = 0; i < result.ranked.size(); ++i)
    if (mapping_of(result.ranked[i].config) == m) return static_cast<int>(i);
  return std::nullopt;
}

}  // namespace v0
}  // namespace moefold
