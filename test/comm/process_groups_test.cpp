// ProcessGroups: every group holds exactly the ranks that FoldedMapping (and so
// `moefold groups`) names — proven by communicating: each rank all-gathers its world rank over
// every group and compares with the group's members. Each group carries its name ("ep") for
// error messages. Run on each backend.

#include <cstdint>
#include <span>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "comm/backends.hpp"
#include "moefold/comm/process_groups.hpp"

using namespace moefold;
using moefold::test::expect_clean;
using moefold::test::RankChecks;

namespace {

std::vector<FoldingConfig> foldings() {
  return {
      {.world = 1},
      {.world = 4, .tp = 2, .ep = 4, .etp = 1},
      {.world = 8, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 1},
      {.world = 8, .cp = 2, .ep = 8, .etp = 1},                     // CP and DP folded into EP
      {.world = 8, .tp = 1, .pp = 2, .ep = 2, .etp = 2},            // ETP > TP
      {.world = 8, .tp = 2, .cp = 2, .ep = 1},                      // EP = 1
      {.world = 8, .tp = 2, .pp = 2, .ep = 2, .etp = 1, .order = "tp-cp-ep-pp-dp"},
      {.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 2},  // spec §1.7
      {.world = 16, .cp = 2, .pp = 2, .ep = 4, .etp = 1, .num_distributed_optimizer_instances = 2},
      {.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 8, .etp = 1},
  };
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("every group of ProcessGroups holds exactly the ranks the folding names",
                        "[comm][groups]", Backends) {
  for (auto const& config : foldings()) {
    auto const fold = FoldedMapping::from(config);
    INFO("world " << config.world << " tp " << config.tp << " cp " << config.cp << " pp "
                  << config.pp << " ep " << config.ep << " order " << config.order);
    expect_clean<TestType>(fold.world_size(), [&](auto& world, RankChecks& checks) {
      ProcessGroups groups(fold, world);
      int const me = world.rank();
      for (Group g : fold.catalogue()) {
        auto const expected = fold.group_of(g, me);
        auto& comm = groups.get(g);
        if (expected.empty()) {
          checks.check(!comm.valid(), fmt::format("{}: rank {} should be in no group", name(g), me));
          continue;
        }
        checks.equal(comm.group_name(), std::string(name(g)), "the group's name in messages");
        checks.equal(comm.size(), static_cast<int>(expected.size()), fmt::format("{} size", name(g)));
        checks.equal(comm.rank(), *fold.rank_in_group(g, me), fmt::format("{} rank", name(g)));
        std::vector<std::int32_t> mine{me}, members(expected.size());
        comm.all_gather(std::span<std::int32_t const>(mine), std::span<std::int32_t>(members));
        checks.check(std::vector<int>(members.begin(), members.end()) == expected,
                     fmt::format("{} group of rank {}: communicated [{}], folding names [{}]",
                                 name(g), me, fmt::join(members, ","), fmt::join(expected, ",")));
      }
    });
  }
}

TEMPLATE_LIST_TEST_CASE("ProcessGroups rejects a world of the wrong size", "[comm][groups]",
                        Backends) {
  expect_clean<TestType>(2, [](auto& world, RankChecks& checks) {
    auto const fold = FoldedMapping::from({.world = 4, .tp = 2});
    std::string message = "no error";
    try {
      ProcessGroups groups(fold, world);
    } catch (invalid_config const& e) {
      message = e.what();
    }
    checks.check(message.find("folding is for world_size 4 but the communicator has 2 ranks") !=
                     std::string::npos,
                 message);
  });
}
