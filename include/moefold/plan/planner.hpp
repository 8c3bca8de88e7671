#pragma once
/// \file
/// The folding planner: enumerates every valid configuration (TP, CP, PP, VPP, EP, ETP,
/// micro-batch size, recompute) of a model on N GPUs, prices each with the cost model and ranks
/// those that fit in memory by predicted throughput. Also reports the best configuration that
/// obeys the pre-folding rule (ETP = TP and EP divides DP·CP), for comparison.

#include <algorithm>
#include <optional>
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
};

/// The planner's answer.
struct PlanResult {
  std::vector<Estimate> ranked;           ///< configurations that fit, best first
  std::optional<Estimate> best_unfolded;  ///< the best that obeys the pre-folding rule
  long mappings = 0;                      ///< valid (TP, CP, PP, EP, ETP) foldings enumerated
  long configurations = 0;                ///< configurations priced (all knobs)
  long fitting = 0;                       ///< of which fit in memory
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

inline std::vector<int> divisors(long n) {
  std::vector<int> out;
  for (long d = 1; d <= n; ++d)
    if (n % d == 0) out.push_back(static_cast<int>(d));
  return out;
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
  if (r.workload.gpus < 1)
    throw invalid_config(fmt::format("--gpus must be at least 1 (got {})", r.workload.gpus));
  if (r.workload.global_batch_size < 1)
    throw invalid_config(
        fmt::format("global batch size must be at least 1 (got {})", r.workload.global_batch_size));
  if (r.workload.seq_length < 1)
    throw invalid_config(
        fmt::format("sequence length must be at least 1 (got {})", r.workload.seq_length));
  if (r.max_micro_batch_size < 1)
    throw invalid_config(
        fmt::format("max micro-batch size must be at least 1 (got {})", r.max_micro_batch_size));
}

}  // namespace detail

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
/// Throws `invalid_config` for an invalid request (model, cluster, workload).
inline PlanResult plan(PlanRequest const& r) {
  detail::validate(r);
  PlanResult out;
  long const W = r.workload.gpus;
  for (int tp : detail::divisors(W)) {
    for (int cp : detail::divisors(W / tp)) {
      for (int pp : detail::divisors(W / (long{tp} * cp))) {
        if (r.model.num_layers % pp != 0) continue;
        // The attention-side groups depend on TP, CP and PP only: place them once.
        std::optional<FoldingPlacement> attention;
        for (int ep : detail::divisors(r.model.num_experts)) {
          if ((W / pp) % ep != 0) continue;
          for (int etp : detail::divisors(W / (long{pp} * ep))) {
            Mapping const m{.tp = tp, .cp = cp, .pp = pp, .ep = ep, .etp = etp};
            ParallelConfig const base{.tp = tp, .cp = cp, .pp = pp, .ep = ep, .etp = etp};
            if (detail::shape_violation(r.model, r.workload, base)) continue;
            std::optional<FoldedMapping> fold;
            try {
              fold = folding_of(r.workload, base);
            } catch (invalid_config const&) {
              continue;
            }
            ++out.mappings;
            if (!attention) {
              attention.emplace();
              place_attention(*attention, *fold, r.cluster.gpus_per_node);
            }
            FoldingPlacement placement = *attention;
            place_moe(placement, *fold, r.cluster.gpus_per_node);
            std::optional<Estimate> best;
            out.configurations += detail::price_variants(r, m, placement, [&](Estimate&& e) {
              ++out.fitting;
              if (!e.folded && (!out.best_unfolded || detail::better(e, *out.best_unfolded)))
                out.best_unfolded = e;
              if (!r.best_per_mapping) {
                out.ranked.push_back(std::move(e));
              } else if (!best || detail::better(e, *best)) {
                best = std::move(e);
              }
            });
            if (best) out.ranked.push_back(std::move(*best));
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
