// Example: describe a folding, build its process groups on an in-process world, and use them.
//
// The attention layers run TP2 x CP2 x DP2 (x PP2) and the MoE layers EP8 x ETP1 over the same
// 16 ranks: every expert-parallel group spans tensor-, context- and data-parallel replicas.
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <span>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/mesh/folded_mapping.hpp"

int main() {
  // 1. The folding. Throws moefold::invalid_config naming the broken rule when the numbers do
  //    not fit.
  auto const fold = moefold::FoldedMapping::from(
      {.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 8, .etp = 1});
  fmt::print("attention TP{} CP{} DP{} PP{} | MoE ETP{} EP{} EDP{} PP{}\n", fold.tp(), fold.cp(),
             fold.dp(), fold.pp(), fold.etp(), fold.ep(), fold.edp(), fold.pp());

  // 2. Sixteen ranks as threads; each builds its communicators and talks over its EP group.
  std::mutex print_mutex;
  moefold::inproc::run(fold.world_size(), [&](moefold::inproc::Communicator& world) {
    moefold::ProcessGroups groups(fold, world);  // collective over the world

    // Who is in my EP group? Ask the group itself.
    auto& ep = groups.ep();
    std::vector<std::int32_t> me{world.rank()}, members(static_cast<std::size_t>(ep.size()));
    ep.all_gather(std::span<std::int32_t const>(me), std::span<std::int32_t>(members));

    // A token count per rank, summed over the EP group (as a dispatcher would).
    std::vector<std::int64_t> tokens{100 + world.rank()};
    ep.all_reduce(std::span<std::int64_t>(tokens));

    if (world.rank() == 0 || world.rank() == 5) {
      auto const a = fold.attention_coord(world.rank());
      std::lock_guard lk(print_mutex);
      fmt::print("rank {:2} (tp {} cp {} dp {} pp {}): EP group {} (EP rank {}), tokens in it {}, "
                 "tp group {}, dp_cp group {}\n",
                 world.rank(), a[moefold::Axis::tp], a[moefold::Axis::cp], a[moefold::Axis::dp],
                 a[moefold::Axis::pp], members, ep.rank(), tokens[0],
                 groups.tp().world_ranks(), groups.dp_cp().world_ranks());
      fmt::print("        EP traffic: {} all_gather bytes sent, {} all_reduce bytes sent\n",
                 ep.traffic()[moefold::CollectiveKind::all_gather].bytes_sent,
                 ep.traffic()[moefold::CollectiveKind::all_reduce].bytes_sent);
    }
  });
  return 0;
}
