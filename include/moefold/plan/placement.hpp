#pragma once
/// \file
/// Where the groups of a folding lie on the machines: for each group kind the planner prices,
/// how many nodes its widest group spans and how many of its members share a node. Computed
/// from the mesh algebra (the slices of `FoldedMapping`'s two meshes), not assumed from the
/// sizes.
///
///   W=16, 8 GPUs per node, TP2 PP2 / EP8 ETP1:  ep groups {0..7} {8..15}: 1 node each
///                                               TP2 PP2 / EP4 ETP2:  ep {0,2,4,6}: 1 node
///   W=32, TP2 PP2 / EP8 ETP2 (ETP = TP):        ep {0,2,..,14}: 2 nodes, 4 members on each

#include <algorithm>
#include <utility>
#include <vector>

#include "moefold/mesh/folded_mapping.hpp"

namespace moefold {
inline namespace v0 {

/// How one kind of group sits on the nodes (its worst group: the one spanning most nodes).
struct GroupPlacement {
  int size = 1;            ///< members per group
  int nodes = 1;           ///< nodes the widest group spans
  int ranks_per_node = 1;  ///< fewest members that group has on one of its nodes
  /// True when every member of every group is on one node (NVLink only).
  bool intra_node() const noexcept { return nodes <= 1; }
};

/// The placements of the groups the cost model prices.
struct FoldingPlacement {
  GroupPlacement tp, cp, dp_cp, ep, etp, edp, pp;
};

namespace detail {

/// The node span of one group (members in ascending order): how many nodes it touches and the
/// fewest members it has on one of them.
template <class Members>
std::pair<int, int> node_span(Members const& members, int gpus_per_node) {
  int const n = static_cast<int>(members.size());
  int nodes = 0, fewest = n, run = 0, node = -1;
  for (int m = 0; m < n; ++m) {
    int const r = static_cast<int>(members[static_cast<std::size_t>(m)]);
    if (r / gpus_per_node != node) {
      if (run > 0) fewest = std::min(fewest, run);
      node = r / gpus_per_node;
      ++nodes;
      run = 0;
    }
    ++run;
  }
  return {nodes, std::min(fewest, run)};
}

}  // namespace detail

/// The placement of the groups of `mesh` over the `varying` axes (a slice: one group per
/// coordinate of the other axes) on nodes of `gpus_per_node` consecutive ranks.
///
/// Work is O(min(groups, gpus_per_node) · group size), not O(world): a group is its base rank
/// plus the same offsets as every other group, so its node pattern depends only on the base
/// modulo gpus_per_node, and one group per residue is enough. The residues the bases reach are
/// found axis by axis over the fixed axes (each adds at most gpus_per_node of them).
inline GroupPlacement place(ProcessMesh const& mesh, AxisSet varying, int gpus_per_node) {
  GroupFamily const family = mesh.groups(varying);
  RankGroup const first = family.group(0);
  GroupPlacement out;
  out.size = first.size();
  out.ranks_per_node = out.size;
  if (out.size <= 1) return out;
  int const G = gpus_per_node;
  // Members come out ascending and consecutive ones differ by at least the first member gap:
  // when that is a whole node, every member sits on its own node.
  if (first[1] - first[0] >= G) {
    out.nodes = out.size;
    out.ranks_per_node = 1;
    return out;
  }
  // One base per reachable residue; bases are offset + Σ c_i · stride_i over the fixed axes.
  std::vector<long> base_of(static_cast<std::size_t>(G), -1);
  base_of[static_cast<std::size_t>(mesh.offset() % G)] = mesh.offset();
  for (int i = 0; i < mesh.axis_count(); ++i) {
    if (varying.contains(mesh.axis(i))) continue;
    std::vector<long> next = base_of;
    for (int r = 0; r < G; ++r) {
      long const base = base_of[static_cast<std::size_t>(r)];
      if (base < 0) continue;
      for (int c = 1; c < std::min(mesh.extent(i), G); ++c) {
        long const b = base + long{c} * mesh.stride(i);
        auto& slot = next[static_cast<std::size_t>(b % G)];
        if (slot < 0) slot = b;
      }
    }
    base_of = std::move(next);
  }
  for (long base : base_of) {
    if (base < 0) continue;
    auto const [nodes, fewest] = detail::node_span(family.containing(static_cast<int>(base)), G);
    if (nodes > out.nodes || (nodes == out.nodes && fewest < out.ranks_per_node)) {
      out.nodes = nodes;
      out.ranks_per_node = fewest;
    }
  }
  return out;
}

/// The placement of the groups of kind `g` of `fold` on nodes of `gpus_per_node` consecutive
/// ranks. Lists every group (O(world)); the planner places slices with the overload above.
inline GroupPlacement place(FoldedMapping const& fold, Group g, int gpus_per_node) {
  GroupPlacement out;
  auto const groups = fold.groups(g);
  if (groups.empty()) return out;
  out.size = static_cast<int>(groups.front().size());
  out.ranks_per_node = out.size;
  for (auto const& members : groups) {
    // Members come in ascending order, so each node's members are contiguous in the list.
    auto const [nodes, fewest] = detail::node_span(members, gpus_per_node);
    if (nodes > out.nodes || (nodes == out.nodes && fewest < out.ranks_per_node)) {
      out.nodes = nodes;
      out.ranks_per_node = fewest;
    }
  }
  return out;
}

/// The placements of the attention-side groups (tp, cp, dp_cp, pp) of `fold`, from its mesh
/// slices (the catalogue's tp, cp, dp_cp and pp groups; see FoldedMapping::groups).
inline void place_attention(FoldingPlacement& out, FoldedMapping const& fold, int gpus_per_node) {
  ProcessMesh const& mesh = fold.attention_mesh();
  out.tp = place(mesh, {Axis::tp}, gpus_per_node);
  out.cp = place(mesh, {Axis::cp}, gpus_per_node);
  out.dp_cp = place(mesh, {Axis::dp, Axis::cp}, gpus_per_node);
  out.pp = place(mesh, {Axis::pp}, gpus_per_node);
}

/// The placements of the MoE-side groups (ep, etp, edp) of `fold`, from its mesh slices.
inline void place_moe(FoldingPlacement& out, FoldedMapping const& fold, int gpus_per_node) {
  ProcessMesh const& mesh = fold.moe_mesh();
  out.ep = place(mesh, {Axis::ep}, gpus_per_node);
  out.etp = place(mesh, {Axis::etp}, gpus_per_node);
  out.edp = place(mesh, {Axis::edp}, gpus_per_node);
}

/// The placements of all priced group kinds of `fold`.
inline FoldingPlacement place(FoldedMapping const& fold, int gpus_per_node) {
  FoldingPlacement out;
  place_attention(out, fold, gpus_per_node);
  place_moe(out, fold, gpus_per_node);
  return out;
}

}  // namespace v0
}  // namespace moefold
