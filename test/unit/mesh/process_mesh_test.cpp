// ProcessMesh and GroupFamily: a mesh is a layout (shape : stride, first axis fastest); groups
// are slices of it, enumerated in Megatron's order.

#include "moefold/mesh/process_mesh.hpp"

#include "support/catch.hpp"

using namespace moefold;

namespace {
constexpr ProcessMesh kMesh{{Axis::tp, 2}, {Axis::cp, 2}, {Axis::dp, 2}, {Axis::pp, 2}};

// The layout algebra is constexpr: these hold at compile time.
static_assert(kMesh.rank_count() == 16);
static_assert(kMesh.stride(2) == 4);
static_assert(kMesh.coord(13)[Axis::dp] == 1 && kMesh.coord(13)[Axis::pp] == 1);
static_assert(kMesh.rank(kMesh.coord(11)) == 11);
static_assert(kMesh.groups({Axis::cp}).count() == 8);
static_assert(kMesh.groups({Axis::cp}).containing(5)[1] == 7);
static_assert(kMesh.groups({Axis::dp, Axis::cp}).group(1)[3] == 7);
static_assert(*kMesh.groups({Axis::dp, Axis::cp}).containing(13).index_of(13) == 2);
}  // namespace

TEST_CASE("a rank's coordinates follow the mixed radix of the layout, first axis fastest") {
  ProcessMesh mesh{{Axis::tp, 2}, {Axis::cp, 3}, {Axis::pp, 2}};
  REQUIRE(mesh.rank_count() == 12);
  auto const c = mesh.coord(9);  // 9 = 1 + 2·1 + 6·1
  CHECK(c[Axis::tp] == 1);
  CHECK(c[Axis::cp] == 1);
  CHECK(c[Axis::pp] == 1);
  CHECK(c[Axis::dp] == 0);  // absent axes read 0
  CHECK(mesh.size(Axis::dp) == 1);
  for (int r = 0; r < mesh.rank_count(); ++r) CHECK(mesh.rank(mesh.coord(r)) == r);
}

TEST_CASE("groups fix the other axes to the digits of the group index, first fixed axis fastest") {
  auto const fam = kMesh.groups({Axis::dp, Axis::cp});
  REQUIRE(fam.count() == 4);
  REQUIRE(fam.group_size() == 4);
  CHECK(fam.lists() == std::vector<std::vector<int>>{
                           {0, 2, 4, 6}, {1, 3, 5, 7}, {8, 10, 12, 14}, {9, 11, 13, 15}});
}

TEST_CASE("a group knows its members' ranks within it and rejects non-members") {
  auto const g = kMesh.groups({Axis::cp, Axis::pp}).containing(5);
  CHECK(g.ranks() == std::vector<int>{5, 7, 13, 15});
  CHECK(g.index_of(13) == 2);
  CHECK_FALSE(g.index_of(6).has_value());
  CHECK_FALSE(g.index_of(-1).has_value());
  CHECK_FALSE(g.contains(4));
}

TEST_CASE("a mesh with an offset lays out ranks from the offset on") {
  ProcessMesh mesh({{Axis::tp, 2}, {Axis::dp, 2}}, 8);
  CHECK(mesh.groups({Axis::dp}).lists() == std::vector<std::vector<int>>{{8, 10}, {9, 11}});
  CHECK(mesh.coord(11)[Axis::dp] == 1);
  CHECK(mesh.groups({Axis::tp}).index_containing(10) == 1);
}

TEST_CASE("the empty axis set gives singleton groups, all axes give one group") {
  CHECK(kMesh.groups({}).count() == 16);
  CHECK(kMesh.groups({}).group(7).ranks() == std::vector<int>{7});
  CHECK(kMesh.groups({Axis::tp, Axis::cp, Axis::dp, Axis::pp}).count() == 1);
}
