// Properties of every folding of every world size up to 64: every (TP, CP, PP, EP, ETP) that
// factorizes the world, under the default order and the dp-last order, with every number of
// distributed-optimizer instances that the sizes allow.

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "moefold/mesh/folded_mapping.hpp"
#include "support/catch.hpp"

using namespace moefold;

namespace {

std::vector<int> divisors(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

/// Everything that must hold for a valid folding; returns the first violation, or "".
std::string violation(FoldedMapping const& f) {
  int const w = f.world_size();
  std::vector<std::vector<int>> owner(kGroupCount, std::vector<int>(static_cast<std::size_t>(w), -1));
  for (Group g : f.catalogue()) {
    auto const groups = f.groups(g);
    auto& own = owner[static_cast<std::size_t>(g)];
    for (std::size_t i = 0; i < groups.size(); ++i) {
      for (int r : groups[i]) {
        if (r < 0 || r >= w) return fmt::format("{}: rank {} outside the world", name(g), r);
        if (own[static_cast<std::size_t>(r)] != -1)
          return fmt::format("{}: rank {} in two groups", name(g), r);
        own[static_cast<std::size_t>(r)] = static_cast<int>(i);
      }
    }
    bool const partial = g == Group::embedding || g == Group::position_embedding;
    if (!partial && std::count(own.begin(), own.end(), -1) != 0)
      return fmt::format("{}: the groups do not cover the world", name(g));
  }
  // Groups of one layout along disjoint axis sets meet in exactly one rank.
  auto meet = [&](Group a, Group b) -> std::string {
    for (int r = 0; r < w; ++r) {
      auto const ga = f.group_of(a, r);
      auto const gb = f.group_of(b, r);
      std::vector<int> both;
      std::set_intersection(ga.begin(), ga.end(), gb.begin(), gb.end(), std::back_inserter(both));
      if (both != std::vector<int>{r})
        return fmt::format("{} and {} groups of rank {} meet in {} ranks", name(a), name(b), r,
                           both.size());
    }
    return "";
  };
  for (auto [a, b] : {std::pair{Group::tp, Group::dp_cp}, {Group::cp, Group::tp_dp},
                      {Group::tp_dp_cp, Group::pp}, {Group::mp, Group::dp_cp},
                      {Group::etp, Group::ep}, {Group::tp_ep, Group::edp},
                      {Group::tp_ep_pp, Group::edp}, {Group::ep, Group::pp}}) {
    if (auto v = meet(a, b); !v.empty()) return v;
  }
  // Coordinates round-trip; ranks within groups follow spec §1.6.
  for (int r = 0; r < w; ++r) {
    auto const a = f.attention_coord(r);
    auto const m = f.moe_coord(r);
    if (f.attention_mesh().rank(a) != r || f.moe_mesh().rank(m) != r)
      return fmt::format("rank {}: coordinates do not round-trip", r);
    if (a[Axis::pp] != m[Axis::pp]) return fmt::format("rank {}: two pipeline stages", r);
    if (f.rank_in_group(Group::ep, r) != m[Axis::ep] ||
        f.rank_in_group(Group::etp, r) != m[Axis::etp] ||
        f.rank_in_group(Group::tp_ep, r) != m[Axis::etp] + f.etp() * m[Axis::ep] ||
        f.rank_in_group(Group::edp, r) != m[Axis::edp] ||
        f.rank_in_group(Group::tp, r) != a[Axis::tp] || f.rank_in_group(Group::pp, r) != a[Axis::pp])
      return fmt::format("rank {}: group rank differs from its coordinate", r);
  }
  // A member's rank within its group is its position among the sorted members (spec §1.6).
  // Derived groups (embedding, optimizer instances) are recomputed on each query, so they are
  // queried for the first and last rank only.
  for (Group g : f.catalogue()) {
    auto const lists = f.groups(g);
    auto const& own = owner[static_cast<std::size_t>(g)];
    bool const derived = g == Group::embedding || g == Group::position_embedding ||
                         static_cast<int>(g) >= kCoreGroupCount;
    for (int r = 0; r < w; ++r) {
      if (derived && r != 0 && r != w - 1) continue;
      int const i = own[static_cast<std::size_t>(r)];
      auto const k = f.rank_in_group(g, r);
      if (i < 0) {
        if (k || !f.group_of(g, r).empty())
          return fmt::format("rank {}: reported in a {} group it is not in", r, name(g));
        continue;
      }
      auto members = lists[static_cast<std::size_t>(i)];
      std::sort(members.begin(), members.end());
      if (f.group_of(g, r) != members || !k || members[static_cast<std::size_t>(*k)] != r)
        return fmt::format("rank {}: wrong rank within its {} group", r, name(g));
    }
  }
  // Both layouts have the same pipeline groups; group sizes are the layout's.
  if (f.attention_mesh().groups({Axis::pp}).lists() != f.moe_mesh().groups({Axis::pp}).lists())
    return "pipeline groups differ";
  auto size_of = [&](Group g) { return f.groups(g).front().size(); };
  if (size_of(Group::tp) != static_cast<std::size_t>(f.tp()) ||
      size_of(Group::dp_cp) != static_cast<std::size_t>(f.dp() * f.cp()) ||
      size_of(Group::ep) != static_cast<std::size_t>(f.ep()) ||
      size_of(Group::edp) != static_cast<std::size_t>(f.edp()) ||
      size_of(Group::tp_ep) != static_cast<std::size_t>(f.etp() * f.ep()))
    return "a group has the wrong size";
  return "";
}

}  // namespace

TEST_CASE("every factorization of every world size up to 64 gives consistent groups") {
  int checked = 0;
  int rejected = 0;
  std::string first_failure;
  for (int w = 1; w <= 64 && first_failure.empty(); ++w) {
    for (int tp : divisors(w))
      for (int cp : divisors(w / tp))
        for (int pp : divisors(w / tp / cp))
          for (int ep : divisors(w / pp))
            for (int etp : divisors(w / pp / ep))
              for (std::string order : {"tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"}) {
                int const dp = w / (tp * cp * pp);
                int const edp = w / (etp * ep * pp);
                bool const expect_valid = order.ends_with("pp") || pp == 1 || dp == edp;
                FoldingConfig c{.world = w, .tp = tp, .cp = cp, .pp = pp, .ep = ep, .etp = etp,
                                .order = order};
                if (!expect_valid) {
                  try {
                    (void)FoldedMapping::from(c);
                    first_failure = fmt::format("W{} TP{} CP{} PP{} EP{} ETP{} {}: accepted", w,
                                                tp, cp, pp, ep, etp, order);
                  } catch (invalid_config const&) {
                    ++rejected;
                  }
                  continue;
                }
                // The largest number of optimizer instances the sizes allow, and 1.
                int const ndoi = std::gcd(dp * cp, edp);
                for (int n : ndoi > 1 ? std::vector<int>{1, ndoi} : std::vector<int>{1}) {
                  c.num_distributed_optimizer_instances = n;
                  auto const v = violation(FoldedMapping::from(c));
                  ++checked;
                  if (!v.empty() && first_failure.empty())
                    first_failure = fmt::format("W{} TP{} CP{} PP{} EP{} ETP{} {} NDOI{}: {}", w,
                                                tp, cp, pp, ep, etp, order, n, v);
                }
              }
  }
  INFO(first_failure);
  CHECK(first_failure.empty());
  CHECK(checked > 50000);
  CHECK(rejected > 1000);
}
