#pragma once
/// \file
/// Where the groups of a folding lie on the machines: for each group kind the planner prices,
/// how many nodes its widest group spans and how many of its members share a node. Computed
/// from the mesh algebra (`FoldedMapping::groups`), not assumed from the sizes.
///
///   W=16, 8 GPUs per node, TP2 PP2 / EP8 ETP1:  ep groups {0..7} {8..15}: 1 node each
///                                               TP2 PP2 / EP4 ETP2:  ep {0,2,4,6}: 1 node
///   W=32, TP2 PP2 / EP8 ETP2 (ETP = TP):        ep {0,2,..,14}: 2 nodes, 4 members on each

#include <algorithm>
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

/// The placement of the groups of kind `g` of `fold` on nodes of `gpus_per_node` consecutive
/// ranks.
inline GroupPlacement place(FoldedMapping const& fold, Group g, int gpus_per_node) {
  GroupPlacement out;
  auto const groups = fold.groups(g);
  if (groups.empty()) return out;
  out.size = static_cast<int>(groups.front().size());
  out.ranks_per_node = out.size;
  for (auto const& members : groups) {
    // Members come in ascending order, so each node's members are contiguous in the list.
    int nodes = 0, fewest = out.size, run = 0, node = -1;
    for (int r : members) {
      if (r / gpus_per_node != node) {
        if (run > 0) fewest = std::min(fewest, run);
        node = r / gpus_per_node;
        ++nodes;
        run = 0;
      }
      ++run;
    }
    fewest = std::min(fewest, run);
    if (nodes > out.nodes || (nodes == out.nodes && fewest < out.ranks_per_node)) {
      out.nodes = nodes;
      out.ranks_per_node = fewest;
    }
  }
  return out;
}

/// The placements of the attention-side groups (tp, cp, dp_cp, pp) of `fold`.
inline void place_attention(FoldingPlacement& out, FoldedMapping const& fold, int gpus_per_node) {
  out.tp = place(fold, Group::tp, gpus_per_node);
  out.cp = place(fold, Group::cp, gpus_per_node);
  out.dp_cp = place(fold, Group::dp_cp, gpus_per_node);
  out.pp = place(fold, Group::pp, gpus_per_node);
}

/// The placements of the MoE-side groups (ep, etp, edp) of `fold`.
inline void place_moe(FoldingPlacement& out, FoldedMapping const& fold, int gpus_per_node) {
  out.ep = place(fold, Group::ep, gpus_per_node);
  out.etp = place(fold, Group::etp, gpus_per_node);
  out.edp = place(fold, Group::edp, gpus_per_node);
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
