// The planner's work is bounded and counted: divisors in O(√n), only sizes that can be valid are
// generated, mappings whose state alone overflows the HBM are dropped before pricing, group
// placement is computed once per layout from one group per node residue, more GPUs than the
// model can use is an error that says why, and a search past its budget stops with an error.
// Bounds are on counters, never on time.

#include <string>
#include <tuple>
#include <vector>
#include <fmt/format.h>

#include "moefold/plan/planner.hpp"
#include "support/catch.hpp"

using namespace moefold;

namespace {

PlanRequest mixtral_on(int gpus) {
  return {.model = mixtral_8x22b(),
          .cluster = h100_cluster(),
          .workload = {.gpus = gpus, .global_batch_size = 256, .seq_length = 4096}};
}

std::vector<int> naive_divisors(long n) {
  std::vector<int> out;
  for (long d = 1; d <= n; ++d)
    if (n % d == 0) out.push_back(static_cast<int>(d));
  return out;
}

}  // namespace

TEST_CASE("divisors are listed ascending, equal to the naive list") {
  for (long n : {1L, 2L, 12L, 36L, 49L, 56L, 97L, 1024L, 5040L, 65536L, 1000000L})
    CHECK(detail::divisors(n) == naive_divisors(n));
  // √n trial divisions: 10^9 and the largest int prime answer without walking to n.
  CHECK(detail::divisors(1'000'000'000L).size() == 100);
  CHECK(detail::divisors(2147483647L) == std::vector<int>{1, 2147483647});
}

TEST_CASE("placement from one group per node residue equals placement over every group") {
  std::string mismatches;
  int foldings = 0;
  for (int world : {8, 12, 16, 24, 48, 64})
    for (int gpus_per_node : {1, 3, 4, 8, 16})
      for (int tp : detail::divisors(world))
        for (int cp : detail::divisors(world / tp))
          for (int pp : detail::divisors(world / tp / cp))
            for (int ep : detail::divisors(world / pp))
              for (int etp : detail::divisors(world / pp / ep)) {
                auto const fold = FoldedMapping::from(
                    {.world = world, .tp = tp, .cp = cp, .pp = pp, .ep = ep, .etp = etp});
                auto const fast = place(fold, gpus_per_node);
                ++foldings;
                auto same = [&](GroupPlacement const& a, Group g) {
                  auto const b = place(fold, g, gpus_per_node);
                  if (std::tie(a.size, a.nodes, a.ranks_per_node) !=
                      std::tie(b.size, b.nodes, b.ranks_per_node))
                    mismatches += fmt::format("W{} G{} TP{} CP{} PP{} EP{} ETP{} {}; ", world,
                                              gpus_per_node, tp, cp, pp, ep, etp, name(g));
                };
                same(fast.tp, Group::tp);
                same(fast.cp, Group::cp);
                same(fast.dp_cp, Group::dp_cp);
                same(fast.pp, Group::pp);
                same(fast.ep, Group::ep);
                same(fast.etp, Group::etp);
                same(fast.edp, Group::edp);
              }
  CHECK(foldings > 5000);
  CHECK(mismatches == "");
}

TEST_CASE("the planner counts its cost-model evaluations and places each layout once") {
  auto const result = plan(mixtral_on(16384));
  INFO(result.mappings << " mappings, " << result.evaluations << " evaluations, "
                       << result.layouts_placed << " layouts placed");
  // One memory bound per mapping, then at most the variants of the mappings that survive it.
  CHECK(result.evaluations == result.mappings + result.configurations);
  CHECK(result.pruned_by_memory > 0);
  CHECK(result.evaluations < 60'000);
  // Placement is linear in the GPUs: it runs per layout, far fewer than the mappings.
  CHECK(result.layouts_placed < result.mappings / 10);
  CHECK_FALSE(result.ranked.empty());
}

TEST_CASE("a million GPUs: only valid sizes are generated, so the search stays small") {
  // With 1 GB of HBM every mapping fails its memory bound, so this counts the enumeration alone
  // (the full plan of 2^20 GPUs is measured in docs/plan.md, not here).
  PlanRequest r = mixtral_on(1 << 20);
  r.cluster.hbm_gb = 1;
  auto const result = plan(r);
  INFO(result.mappings << " mappings");
  // DP divides the batch of 256, so TP·CP·PP ≥ 4096: about a thousand mappings, not millions.
  CHECK(result.mappings > 100);
  CHECK(result.mappings < 2000);
  CHECK(result.pruned_by_memory == result.mappings);
  CHECK(result.evaluations == result.mappings);
  CHECK(result.layouts_placed == 0);
}

TEST_CASE("more GPUs than the model can use is an error derived from the model") {
  auto const r = mixtral_on(2147483647);
  // TP·CP ≤ 2048 (TP | gcd(48, 8) = 8, 2·CP·TP | 4096), PP ≤ 56 layers, DP ≤ 256 sequences.
  CHECK(max_useful_gpus(r.model, r.workload) == 2048L * 56 * 256);
  CHECK_THROWS_WITH(plan(r), Catch::Contains("--gpus 2147483647: at most 29360128 GPUs can hold "
                                             "model 'mixtral-8x22b' usefully") &&
                                 Catch::Contains("PP ≤ num_layers 56") &&
                                 Catch::Contains("DP ≤ global batch 256"));
  CHECK_FALSE(too_many_gpus(r.model, mixtral_on(29360128).workload).has_value());
}

TEST_CASE("a model of 10^9 layers is planned with a bounded number of evaluations") {
  PlanRequest r = mixtral_on(4096);
  r.model.num_layers = 1'000'000'000;
  auto const result = plan(r);
  // Every mapping's weights overflow 80 GB: each costs one memory bound and nothing is priced.
  CHECK(result.mappings > 0);
  CHECK(result.pruned_by_memory == result.mappings);
  CHECK(result.configurations == 0);
  CHECK(result.evaluations == result.mappings);
  CHECK(result.ranked.empty());
}

TEST_CASE("a search past its evaluation budget stops with an error naming the budget") {
  PlanRequest r = mixtral_on(128);
  r.max_evaluations = 100;
  CHECK_THROWS_WITH(plan(r), Catch::Contains("exceeds 100 cost-model evaluations"));
}

TEST_CASE("workload sizes beyond the int range are rejected with the value") {
  PlanRequest r = mixtral_on(128);
  r.workload.global_batch_size = 1L << 40;
  CHECK_THROWS_WITH(plan(r),
                    "global batch size must be between 1 and 2147483647 (got "
                    "1099511627776)");
  r = mixtral_on(128);
  r.workload.seq_length = -4;
  CHECK_THROWS_WITH(plan(r), "sequence length must be between 1 and 2147483647 (got -4)");
  r = mixtral_on(128);
  r.cluster.gpus_per_node = 1 << 20;
  CHECK_THROWS_WITH(plan(r), "cluster 'h100': gpus_per_node must be at most 1024 (got 1048576)");
  r = mixtral_on(128);
  r.model.kv_channels = -1;
  CHECK_THROWS_WITH(plan(r), "model 'mixtral-8x22b': kv_channels must not be negative (got -1)");
}
