// FoldedMapping: Megatron-Core's group generator, checked on the worked examples of
// spec §1.7–1.8 (exact goldens) and on every rejection rule of spec §1.4.

#include "moefold/mesh/folded_mapping.hpp"

#include <string>

#include "support/catch.hpp"

using namespace moefold;
using Lists = std::vector<std::vector<int>>;

namespace {
Lists range_groups(int count, int size) {
  Lists out;
  for (int g = 0; g < count; ++g) {
    out.emplace_back();
    for (int m = 0; m < size; ++m) out.back().push_back(g * size + m);
  }
  return out;
}

std::string rejection(FoldingConfig const& c) {
  try {
    (void)FoldedMapping::from(c);
  } catch (invalid_config const& e) {
    return e.what();
  }
  return "accepted";
}
}  // namespace

TEST_CASE("spec §1.7: W16 TP2 CP2 PP2 / EP4 ETP2 folds CP and DP into EP") {
  auto const f = FoldedMapping::from({.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 2});
  CHECK(f.dp() == 2);
  CHECK(f.edp() == 1);
  CHECK(f.groups(Group::tp) == range_groups(8, 2));
  CHECK(f.groups(Group::cp) == Lists{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14},
                                     {13, 15}});
  CHECK(f.groups(Group::dp) == Lists{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14},
                                     {11, 15}});
  CHECK(f.groups(Group::dp_cp) ==
        Lists{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}});
  CHECK(f.groups(Group::pp) == Lists{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14},
                                     {7, 15}});
  CHECK(f.groups(Group::ep) ==
        Lists{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}});
  CHECK(f.groups(Group::etp) == f.groups(Group::tp));
  CHECK(f.groups(Group::tp_ep) == range_groups(2, 8));
  CHECK(f.groups(Group::edp) == range_groups(16, 1));
  CHECK(f.groups(Group::embedding) == Lists{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13},
                                            {6, 14}, {7, 15}});
  CHECK(f.groups(Group::position_embedding) == range_groups(8, 1));

  auto const a = f.attention_coord(5);
  CHECK((a[Axis::tp] == 1 && a[Axis::cp] == 0 && a[Axis::dp] == 1 && a[Axis::pp] == 0));
  auto const m = f.moe_coord(5);
  CHECK((m[Axis::etp] == 1 && m[Axis::ep] == 2 && m[Axis::edp] == 0 && m[Axis::pp] == 0));
  CHECK(f.group_of(Group::ep, 5) == std::vector<int>{1, 3, 5, 7});
  CHECK(f.rank_in_group(Group::ep, 5) == 2);
  CHECK(f.rank_in_group(Group::tp_ep, 5) == 5);
  CHECK(f.group_of(Group::embedding, 12) == std::vector<int>{4, 12});
  CHECK(f.group_of(Group::position_embedding, 12).empty());
  CHECK_FALSE(f.rank_in_group(Group::position_embedding, 12).has_value());
}

TEST_CASE("spec §1.8: order tp-cp-ep-pp-dp puts dp slowest") {
  auto const f = FoldedMapping::from(
      {.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 2, .etp = 2, .order = "tp-cp-ep-pp-dp"});
  CHECK(f.dp() == 2);
  CHECK(f.edp() == 2);
  CHECK(f.groups(Group::tp) == range_groups(8, 2));
  CHECK(f.groups(Group::cp) == Lists{{0, 2}, {1, 3}, {4, 6}, {5, 7}, {8, 10}, {9, 11}, {12, 14},
                                     {13, 15}});
  CHECK(f.groups(Group::dp) == Lists{{0, 8}, {1, 9}, {2, 10}, {3, 11}, {4, 12}, {5, 13}, {6, 14},
                                     {7, 15}});
  CHECK(f.groups(Group::dp_cp) ==
        Lists{{0, 2, 8, 10}, {1, 3, 9, 11}, {4, 6, 12, 14}, {5, 7, 13, 15}});
  CHECK(f.groups(Group::pp) == Lists{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14},
                                     {11, 15}});
  CHECK(f.groups(Group::ep) == f.groups(Group::cp));
  CHECK(f.groups(Group::etp) == f.groups(Group::tp));
  CHECK(f.groups(Group::edp) == f.groups(Group::dp));
  CHECK(f.groups(Group::tp_ep) == range_groups(4, 4));
}

TEST_CASE("spec §1.8: two distributed-optimizer instances cut the data-parallel groups") {
  auto const f = FoldedMapping::from({.world = 16,
                                      .tp = 1,
                                      .cp = 2,
                                      .pp = 2,
                                      .ep = 4,
                                      .etp = 1,
                                      .num_distributed_optimizer_instances = 2});
  CHECK(f.dp() == 4);
  CHECK(f.edp() == 2);
  CHECK(f.catalogue().size() == 20);
  CHECK(f.groups(Group::cp) == range_groups(8, 2));
  CHECK(f.groups(Group::dp) ==
        Lists{{0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}});
  CHECK(f.groups(Group::dp_cp) == range_groups(2, 8));
  CHECK(f.groups(Group::ep) == range_groups(4, 4));
  CHECK(f.groups(Group::edp) == Lists{{0, 4}, {1, 5}, {2, 6}, {3, 7}, {8, 12}, {9, 13}, {10, 14},
                                      {11, 15}});
  CHECK(f.groups(Group::intra_partial_dp_cp) == range_groups(4, 4));
  CHECK(f.groups(Group::intra_partial_edp) ==
        Lists{{0}, {4}, {1}, {5}, {2}, {6}, {3}, {7}, {8}, {12}, {9}, {13}, {10}, {14}, {11}, {15}});
  CHECK(f.groups(Group::inter_partial_edp) == f.groups(Group::edp));
  // tp_ep_pp groups are {0..3, 8..11} and {4..7, 12..15}; one per instance (Ie = 1).
  CHECK(f.groups(Group::tp_ep_pp) == Lists{{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}});
  CHECK(f.groups(Group::intra_dist_opt_instance) == f.groups(Group::tp_ep_pp));
}

TEST_CASE("ETP defaults to TP, as in Megatron") {
  auto const f = FoldedMapping::from({.world = 8, .tp = 2, .ep = 2});
  CHECK(f.etp() == 2);
  CHECK(f.edp() == 2);
  CHECK(f.groups(Group::etp) == f.groups(Group::tp));
}

TEST_CASE("one rank is a valid folding whose groups are all {0}") {
  auto const f = FoldedMapping::from({.world = 1});
  for (Group g : f.catalogue()) CHECK(f.groups(g) == Lists{{0}});
}

TEST_CASE("order strings are case-insensitive and missing size-1 axes are appended") {
  auto const f = FoldedMapping::from({.world = 8, .tp = 2, .pp = 2, .ep = 2, .order = "TP-EP-DP-PP"});
  CHECK(f.order() == "tp-ep-dp-pp");
  CHECK(f.groups(Group::pp) == Lists{{0, 4}, {1, 5}, {2, 6}, {3, 7}});
}

TEST_CASE("each of Megatron's rules rejects a bad folding with a message naming it") {
  using Catch::Matchers::Contains;
  CHECK_THAT(rejection({.world = 12, .tp = 2, .cp = 2, .pp = 2}),
             Contains("world_size (12) is not divisible by model_size TP·PP·CP = 8"));
  CHECK_THAT(rejection({.world = 8, .tp = 2, .vpp = 2}),
             Contains("requires pipeline_model_parallel_size > 1 (PP=1)"));
  CHECK_THAT(rejection({.world = 8, .tp = 2, .ep = 3}),
             Contains("world_size (8) is not divisible by expert_tensor_model_pipeline_parallel "
                      "size ETP·EP·PP = 6 (ETP=2, EP=3, PP=1)"));
  CHECK_THAT(
      rejection({.world = 16, .tp = 2, .pp = 2, .ep = 4, .etp = 1, .order = "tp-cp-ep-pp-dp"}),
      Contains("data parallel size of the attention and moe layers must be the same") &&
          Contains("DP=4 and EDP=2"));
  CHECK_THAT(rejection({.world = 8, .tp = 2, .pp = 2, .ep = 2, .etp = 1, .order = "tp-pp-ep-dp"}),
             Contains("same pipeline (pp) groups"));
  CHECK_THAT(rejection({.world = 9, .cp = 3, .num_distributed_optimizer_instances = 2}),
             Contains("DP·CP = 9 (DP=3, CP=3) is not divisible by "
                      "num_distributed_optimizer_instances = 2"));
  CHECK_THAT(
      rejection({.world = 8, .cp = 2, .ep = 8, .num_distributed_optimizer_instances = 2}),
      Contains("EDP = 1 is not divisible by num_distributed_optimizer_instances = 2"));
  CHECK_THAT(rejection({.world = 8, .tp = 0}),
             Contains("tensor_model_parallel_size (TP) must be at least 1 (got 0)"));
  CHECK_THAT(rejection({.world = 0}), Contains("world_size must be at least 1 (got 0)"));
}

TEST_CASE("malformed order strings are rejected naming the axis") {
  using Catch::Matchers::Contains;
  CHECK_THAT(rejection({.world = 4, .tp = 2, .order = "tp-xp-dp-pp"}),
             Contains("unknown axis name 'xp'"));
  CHECK_THAT(rejection({.world = 4, .tp = 2, .order = "tp-dp-tp-pp"}),
             Contains("axis 'tp' appears more than once"));
  CHECK_THAT(rejection({.world = 4, .tp = 2, .order = "tp--pp"}), Contains("unknown axis name ''"));
  CHECK_THAT(rejection({.world = 8, .cp = 2, .order = "tp-ep-dp-pp"}),
             Contains("leaves out axis 'cp', whose size in the attention layout is 2"));
  CHECK_THAT(rejection({.world = 8, .ep = 4, .order = "tp-cp-dp-pp"}),
             Contains("leaves out axis 'ep', whose size in the MoE layout is 4"));
}

TEST_CASE("rank queries outside the world are rejected") {
  auto const f = FoldedMapping::from({.world = 4, .tp = 2});
  CHECK_THROWS_AS(f.group_of(Group::tp, 4), error);
  CHECK_THROWS_AS(f.rank_in_group(Group::tp, -1), error);
}
