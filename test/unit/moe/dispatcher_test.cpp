// TokenDispatcher (all-to-all and all-gather) against the serial reference on in-process worlds:
// for every folding, the MoE output with fixed per-expert functions and its gradients equal the
// single-rank computation; metadata equals a direct count; the EP all-to-all moves exactly the
// rows the routing needs (Megatron's rows and dedup rows).

#include <algorithm>
#include <set>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "comm/backends.hpp"
#include "moe_test_support.hpp"
#include "support/exec.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/all_gather_dispatcher.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"

using namespace moefold;
using moefold::test::expect_clean;
using moefold::test::InprocHarness;
using moefold::test::RankChecks;
using moefold::test::rel_error;
using moefold::test::Skew;
using Comm = inproc::Communicator;

namespace {

constexpr std::int64_t kHidden = 6;
constexpr double kTol = 1e-5;

struct Case {
  FoldingConfig folding;
  int local_experts = 2;  // L
  int topk = 2;
  Skew skew = Skew::uniform;
};

std::vector<Case> cases() {
  return {
      {{.world = 1}, 4, 2},
      {{.world = 1}, 1, 1},
      {{.world = 2, .tp = 2, .ep = 1}, 3, 2},
      {{.world = 2, .tp = 2, .ep = 2, .etp = 1}, 2, 2, Skew::first_ranks},
      {{.world = 2, .ep = 2, .etp = 1}, 1, 1},
      {{.world = 2, .cp = 2, .ep = 2, .etp = 1}, 2, 3},
      {{.world = 2, .tp = 2, .ep = 1, .etp = 2}, 2, 2},
      {{.world = 2, .ep = 1, .etp = 2}, 3, 2},
      {{.world = 4, .tp = 2, .cp = 2, .ep = 4, .etp = 1}, 2, 2},
      {{.world = 4, .tp = 2, .ep = 2, .etp = 2}, 2, 2, Skew::first_ranks},
      {{.world = 4, .tp = 4, .ep = 4, .etp = 1}, 1, 2},
      {{.world = 4, .cp = 4, .ep = 4, .etp = 1}, 3, 2, Skew::first_ranks},
      {{.world = 4, .ep = 4, .etp = 1}, 2, 3},
      {{.world = 4, .tp = 2, .ep = 4, .etp = 1}, 1, 1},
      {{.world = 4, .ep = 2, .etp = 2}, 2, 2},
      {{.world = 4, .ep = 1, .etp = 4}, 2, 2},
      {{.world = 4, .tp = 2, .ep = 1, .etp = 2}, 3, 2},
      {{.world = 4, .cp = 2, .ep = 2, .etp = 2}, 1, 2, Skew::first_ranks},
      {{.world = 8, .tp = 2, .cp = 2, .ep = 8, .etp = 1}, 1, 2, Skew::first_ranks},
      {{.world = 8, .tp = 2, .cp = 2, .ep = 4, .etp = 2}, 2, 2},
      {{.world = 8, .cp = 2, .ep = 8, .etp = 1}, 2, 2},
      {{.world = 8, .tp = 2, .ep = 4, .etp = 2}, 3, 2, Skew::first_ranks},
      {{.world = 8, .tp = 4, .ep = 2, .etp = 4}, 2, 2},
      {{.world = 8, .ep = 8, .etp = 1}, 1, 1, Skew::first_ranks},
      {{.world = 8, .tp = 2, .ep = 2, .etp = 1}, 2, 2},
      {{.world = 8, .cp = 4, .ep = 2, .etp = 2}, 2, 3},
      {{.world = 8, .tp = 2, .cp = 4, .ep = 8, .etp = 1}, 1, 1},
      {{.world = 8, .tp = 8, .ep = 8, .etp = 1}, 2, 2},
      {{.world = 8, .ep = 4, .etp = 2}, 2, 2, Skew::first_ranks},
      {{.world = 16, .tp = 2, .cp = 2, .ep = 8, .etp = 2}, 2, 2, Skew::first_ranks},
      {{.world = 16, .tp = 2, .cp = 2, .ep = 16, .etp = 1}, 1, 2},
      {{.world = 16, .tp = 4, .ep = 4, .etp = 4}, 2, 2},
      {{.world = 16, .cp = 4, .ep = 16, .etp = 1}, 1, 1, Skew::first_ranks},
      {{.world = 16, .tp = 2, .cp = 4, .ep = 4, .etp = 2}, 3, 2},
      {{.world = 16, .tp = 4, .cp = 2, .ep = 8, .etp = 1}, 2, 2},
  };
}

/// Tokens of world rank r: varies by rank, and is 0 on some ranks (where allowed).
std::int64_t tokens_of(int rank, bool equal) {
  if (equal) return 8;
  if (rank % 5 == 3) return 0;
  return 4 + 3 * (rank % 4);
}

enum class Kind { all_to_all, all_gather };

struct Mode {
  Kind kind;
  bool dedup;
  int drop;  // 0 dropless, 1 probs, 2 position
  bool pad;
  double cf;
  std::string name() const {
    return fmt::format("{}{}{}{}", kind == Kind::all_to_all ? "all_to_all" : "all_gather",
                       dedup ? "+dedup" : "",
                       drop == 0   ? " dropless"
                       : drop == 1 ? " drop=probs"
                                   : " drop=position",
                       pad ? "+pad" : "");
  }
};

std::vector<Mode> modes() {
  return {
      {Kind::all_to_all, false, 0, false, 0},  {Kind::all_to_all, true, 0, false, 0},
      {Kind::all_to_all, true, 1, false, 0.5}, {Kind::all_to_all, false, 2, false, 0.75},
      {Kind::all_to_all, false, 1, true, 1.0}, {Kind::all_to_all, true, 2, true, 0.5},
      {Kind::all_gather, false, 0, false, 0},  {Kind::all_gather, false, 1, true, 1.0},
  };
}

template <class Drop>
void apply_drop(Drop const& drop, Routing<float>& r, int k) {
  apply_capacity(drop, r, k);
}

/// Runs one mode on this rank and checks everything against the serial reference.
template <class Dispatcher, class Drop>
void check_mode(Dispatcher& d, Drop const& drop, Mode const& mode, Case const& c,
                FoldedMapping const& fold, ProcessGroups<Comm>& groups, RankChecks& checks) {
  int const me = groups.world().rank();
  int const E = c.local_experts * fold.ep();
  bool const equal = mode.kind == Kind::all_gather || mode.pad;
  auto const T = tokens_of(me, equal);
  auto const where = fmt::format("{} on world rank {}", mode.name(), me);
  auto routing = test::test_routing<float>(me, T, E, c.topk, c.skew);
  auto const x = test::tensor<float>("x", me, T, kHidden);
  auto const g = test::tensor<float>("g", me, T, kHidden);

  auto const& meta = d.plan(routing);
  auto in = d.dispatch(x, routing.probs);
  int const ep_rank = groups.ep().rank(), etp = groups.etp().size();
  // Experts: f_e split over ETP (each ETP rank computes f_e / ETP, so the sum over etp is f_e).
  std::vector<float> y_e(in.expert_input.size());
  std::vector<int> row_expert;
  for (int l = 0; l < c.local_experts; ++l)
    for (std::int64_t n = 0; n < in.tokens_per_local_expert[static_cast<std::size_t>(l)]; ++n)
      row_expert.push_back(ep_rank * c.local_experts + l);
  checks.equal(row_expert.size(), in.expert_probs.size(),
               where + ": rows vs tokens_per_local_expert");
  if (row_expert.size() != in.expert_probs.size()) return;
  for (std::size_t i = 0; i < row_expert.size(); ++i)
    for (std::int64_t h = 0; h < kHidden; ++h) {
      auto const at = i * kHidden + static_cast<std::size_t>(h);
      y_e[at] =
          test::expert_fn<float>(row_expert[i], in.expert_input[at]) / static_cast<float>(etp);
    }
  auto const y = d.combine(y_e);

  auto kept = routing;
  apply_drop(drop, kept, c.topk);
  auto const ref = test::serial_moe<float>(kept, x, g, kHidden);
  checks.check(rel_error<float>(y, ref.y) <= kTol,
               fmt::format("{}: output differs from the serial reference by {}", where,
                           rel_error<float>(y, ref.y)));

  auto cg = d.combine_backward(g);
  std::vector<float> d_in(cg.d_expert_output.size());
  for (std::size_t i = 0; i < row_expert.size(); ++i)
    for (std::int64_t h = 0; h < kHidden; ++h) {
      auto const at = i * kHidden + static_cast<std::size_t>(h);
      d_in[at] =
          static_cast<float>(row_expert[i] + 1) / static_cast<float>(etp) * cg.d_expert_output[at];
    }
  auto dg = d.dispatch_backward(d_in, cg.d_expert_probs);
  checks.check(rel_error<float>(dg.d_hidden, ref.dx) <= kTol,
               fmt::format("{}: d_hidden differs by {}", where, rel_error<float>(dg.d_hidden, ref.dx)));
  checks.check(rel_error<float>(dg.d_probs, ref.dp) <= kTol,
               fmt::format("{}: d_probs differs by {}", where, rel_error<float>(dg.d_probs, ref.dp)));

  // Metadata by direct count: every rank of my tp_ep group recomputes its routing here.
  auto members = fold.group_of(Group::tp_ep, me);
  std::sort(members.begin(), members.end());
  int const L = c.local_experts, ep = fold.ep();
  int const my_etp = groups.etp().rank();
  std::vector<std::int64_t> tpe(static_cast<std::size_t>(L), 0);
  std::vector<std::int64_t> output_splits(static_cast<std::size_t>(ep), 0);
  auto distinct_to = [&](Routing<float> const& r, int j) {
    std::int64_t n = 0;
    for (std::int64_t t = 0; t < r.num_tokens; ++t) {
      bool any = false;
      for (int l = 0; l < L; ++l)
        any = any || r.map[static_cast<std::size_t>(t * E + j * L + l)] != Route::none;
      n += any;
    }
    return n;
  };
  for (std::size_t r = 0; r < members.size(); ++r) {
    int const m = members[r];
    int const t = static_cast<int>(r) % etp, j = static_cast<int>(r) / etp;
    auto rm = test::test_routing<float>(m, tokens_of(m, equal), E, c.topk, c.skew);
    apply_drop(drop, rm, c.topk);
    auto const n = rm.tokens_per_expert();
    for (int l = 0; l < L; ++l)
      tpe[static_cast<std::size_t>(l)] += n[static_cast<std::size_t>(ep_rank * L + l)];
    if (t == my_etp) {
      std::int64_t rows = 0;
      if (meta.dedup)
        rows = distinct_to(rm, ep_rank);
      else
        for (int l = 0; l < L; ++l) rows += n[static_cast<std::size_t>(ep_rank * L + l)];
      output_splits[static_cast<std::size_t>(j)] = rows;
    }
  }
  checks.check(meta.tokens_per_local_expert == tpe && in.tokens_per_local_expert == tpe,
               fmt::format("{}: tokens_per_local_expert [{}] != direct count [{}]", where,
                           fmt::join(meta.tokens_per_local_expert, ","), fmt::join(tpe, ",")));
  if (mode.kind != Kind::all_to_all) return;
  checks.check(meta.output_splits == output_splits,
               fmt::format("{}: output_splits [{}] != direct count [{}]", where,
                           fmt::join(meta.output_splits, ","), fmt::join(output_splits, ",")));
  std::vector<std::int64_t> input_splits(static_cast<std::size_t>(ep), 0);
  auto const n_me = kept.tokens_per_expert();
  std::uint64_t rows_to_others = 0;
  for (int j = 0; j < ep; ++j) {
    std::int64_t rows = 0;
    if (meta.dedup)
      rows = distinct_to(kept, j);
    else
      for (int l = 0; l < L; ++l) rows += n_me[static_cast<std::size_t>(j * L + l)];
    input_splits[static_cast<std::size_t>(j)] = rows;
    if (j != ep_rank) rows_to_others += static_cast<std::uint64_t>(rows);
  }
  checks.check(meta.input_splits == input_splits,
               fmt::format("{}: input_splits [{}] != direct count [{}]", where,
                           fmt::join(meta.input_splits, ","), fmt::join(input_splits, ",")));
  // Bytes: Megatron moves one row per (token, expert on another EP rank); dedup one row per
  // (token, distinct other EP rank). Both counted from the routing map above.
  checks.equal(meta.ep_token_bytes_sent, rows_to_others * kHidden * sizeof(float),
               where + ": EP all-to-all payload bytes");
}

template <class Drop>
void run_mode(Mode const& mode, Drop drop, Case const& c, FoldedMapping const& fold,
              ProcessGroups<Comm>& groups, RankChecks& checks) {
  DispatcherConfig const cfg{.num_experts = c.local_experts * fold.ep(),
                             .moe_router_topk = c.topk,
                             .hidden_size = kHidden,
                             .dedup = mode.dedup};
  if (mode.kind == Kind::all_to_all) {
    typename AllToAllDispatcher<Drop>::template dispatcher<test::Exec, Comm, float> d(cfg, drop, groups);
    check_mode(d, drop, mode, c, fold, groups, checks);
    // A second routing through the same dispatcher (plan is per routing).
    check_mode(d, drop, mode, c, fold, groups, checks);
  } else {
    typename AllGatherDispatcher<Drop>::template dispatcher<test::Exec, Comm, float> d(cfg, drop, groups);
    check_mode(d, drop, mode, c, fold, groups, checks);
  }
}

}  // namespace

TEST_CASE(
    "dispatch → experts → combine equals the serial MoE, forward and backward, with "
    "metadata and bytes by direct count, across foldings",
    "[moe][dispatcher]") {
  auto const all = cases();
  REQUIRE(all.size() >= 30);
  for (auto const& c : all) {
    auto const fold = FoldedMapping::from(c.folding);
    INFO("world " << c.folding.world << " tp " << c.folding.tp << " cp " << c.folding.cp << " ep "
                  << c.folding.ep << " etp " << fold.etp() << " L " << c.local_experts << " K "
                  << c.topk);
    expect_clean<InprocHarness>(fold.world_size(), [&](Comm& world, RankChecks& checks) {
      ProcessGroups<Comm> groups(fold, world);
      for (auto const& mode : modes()) {
        if (mode.drop == 0)
          run_mode(mode, Dropless{}, c, fold, groups, checks);
        else if (mode.drop == 1)
          run_mode(mode, DropByProbs{mode.cf, mode.pad}, c, fold, groups, checks);
        else
          run_mode(mode, DropByPosition{mode.cf, mode.pad}, c, fold, groups, checks);
      }
    });
  }
}

TEST_CASE("dispatcher rejects bad configurations and inputs with clear messages",
          "[moe][dispatcher][errors]") {
  auto const fold = FoldedMapping::from({.world = 2, .ep = 2, .etp = 1});
  std::vector<std::string> messages(2);
  expect_clean<InprocHarness>(2, [&](Comm& world, RankChecks&) {
    ProcessGroups<Comm> groups(fold, world);
    auto& msg = messages[static_cast<std::size_t>(world.rank())];
    try {
      AllToAllTokenDispatcher<test::Exec, Dropless, Comm, float> d(
          {.num_experts = 3, .moe_router_topk = 1, .hidden_size = 4}, {}, groups);
    } catch (invalid_config const& e) {
      msg = e.what();
    }
    msg += " | ";
    AllToAllTokenDispatcher<test::Exec, Dropless, Comm, float> d(
        {.num_experts = 4, .moe_router_topk = 1, .hidden_size = 4}, {}, groups);
    try {
      d.plan(Routing<float>::empty(2, 6));
    } catch (error const& e) {
      msg += e.what();
    }
    msg += " | ";
    d.plan(Routing<float>::empty(2, 4));
    try {
      std::vector<float> const x7(7), p8(8);
      d.dispatch(x7, p8);
    } catch (error const& e) {
      msg += e.what();
    }
  });
  for (auto const& m : messages) {
    CHECK_THAT(m,
               Catch::Matchers::Contains("num_experts (3) must be divisible by the EP size (2)"));
    CHECK_THAT(m, Catch::Matchers::Contains("routing over 6 experts, configured for 4"));
    CHECK_THAT(m, Catch::Matchers::Contains("hidden has 7 elements, planned T·H = 2·4"));
  }
}
