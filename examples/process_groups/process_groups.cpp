// Example: describe a folding and ask which ranks each rank talks to.
//
// The attention layers run TP2 x CP2 x DP2 (x PP2) and the MoE layers EP8 x ETP1 over the same
// 16 ranks: every expert-parallel group spans tensor-, context- and data-parallel replicas.
#include <cstdio>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/mesh/folded_mapping.hpp"

int main() {
  // Throws moefold::invalid_config naming the broken rule when the numbers do not fit.
  auto const fold = moefold::FoldedMapping::from(
      {.world = 32, .tp = 2, .cp = 2, .pp = 2, .ep = 8, .etp = 1});
  fmt::print("attention TP{} CP{} DP{} PP{} | MoE ETP{} EP{} EDP{} PP{}\n", fold.tp(), fold.cp(),
             fold.dp(), fold.pp(), fold.etp(), fold.ep(), fold.edp(), fold.pp());
  for (int rank : {0, 5, 21}) {
    auto const a = fold.attention_coord(rank);
    fmt::print("rank {:2}: tp {} cp {} dp {} pp {}\n", rank, a[moefold::Axis::tp],
               a[moefold::Axis::cp], a[moefold::Axis::dp], a[moefold::Axis::pp]);
    for (auto g : {moefold::Group::tp, moefold::Group::dp_cp, moefold::Group::ep,
                   moefold::Group::edp, moefold::Group::pp}) {
      fmt::print("  {:<6} rank {} of {}\n", moefold::name(g), *fold.rank_in_group(g, rank),
                 fold.group_of(g, rank));
    }
  }
  return 0;
}
