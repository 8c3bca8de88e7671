// Full dispatch + combine (all-to-all dispatcher, dropless) on an 8-rank in-process world with
// EP = 8: T = 16384 tokens in all (2048 per rank), H = 1024, E = 64, top-8, fp32. Reported as
// the ratio of the time of copying the same bytes (each rank memcpy's the rows it moves in
// dispatch and in combine, 8 threads at once) to the time of dispatch + combine. `peer` 1: rows
// move by peer reads (DispatcherConfig::peer_reads, the default on the in-process world), 0: by
// the all-to-all collectives. As the MoE layer does, the step hands the expert output to combine
// (kept for the backward without a copy) and gives the combined output back (`give_back`).
//
//   build/bin/bench_moe_dispatch --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <barrier>
#include <cstring>
#include <thread>

#include "moe_bench_support.hpp"
#include "moefold/comm/inproc/run.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"

namespace {

using namespace moefold;
using namespace moefold::bench;
using Comm = inproc::Communicator;
constexpr int kRanks = 8;

/// Seconds for kRanks threads to each memcpy `bytes[r]` bytes, between two barriers.
double memcpy_seconds(std::vector<std::size_t> const& bytes) {
  std::barrier sync(kRanks);
  double seconds = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      std::vector<std::byte> src(bytes[static_cast<std::size_t>(r)], std::byte{1}), dst(src.size());
      sync.arrive_and_wait();
      auto const t0 = Clock::now();
      std::memcpy(dst.data(), src.data(), src.size());
      benchmark::ClobberMemory();
      sync.arrive_and_wait();
      if (r == 0) seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    });
  for (auto& t : threads) t.join();
  return seconds;
}

void BM_DispatchCombine(benchmark::State& state) {
  bool const zipf = state.range(0) != 0, dedup = state.range(1) != 0,
             peer = state.range(2) != 0;
  auto const fold = FoldedMapping::from({.world = kRanks, .ep = kRanks, .etp = 1});
  std::int64_t const t_local = kTokens / kRanks;
  double lib = 0, ref = 0;
  for (auto _ : state) {
    double seconds = 0;
    std::vector<std::size_t> moved(kRanks);
    inproc::run(kRanks, [&](Comm& world) {
      ProcessGroups<Comm> groups(fold, world);
      AllToAllTokenDispatcher<Cpu, Dropless, Comm, float> d({.num_experts = kExperts,
                                                        .moe_router_topk = kTopK,
                                                        .hidden_size = kHidden,
                                                        .dedup = dedup,
                                                        .peer_reads = peer},
                                                       {}, groups);
      auto const r = bench_routing(t_local, zipf, 10u + static_cast<unsigned>(world.rank()));
      auto const x = bench_tensor(static_cast<std::size_t>(t_local * kHidden));
      auto step = [&] {
        d.plan(r);
        auto in = d.dispatch(x, r.probs);
        auto y = d.combine_owned(std::move(in.expert_input));  // identity experts; kept, not copied
        benchmark::DoNotOptimize(y.data());
        d.give_back(std::move(y));
      };
      // Warm-up: first touch of buffers, as in every training step but the first. Two steps:
      // the dispatcher keeps a step's expert output for its backward until the next combine,
      // so its buffers cycle through the pool from the third step on.
      step();
      step();
      world.barrier();
      auto const t0 = Clock::now();
      step();
      world.barrier();
      if (world.rank() == 0) seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      // Rows crossing ranks or buffers: what this rank sent plus what it received, both ways.
      auto const& m = d.metadata();
      std::int64_t rows = 0;
      for (auto v : m.input_splits) rows += v;
      for (auto v : m.output_splits) rows += v;
      moved[static_cast<std::size_t>(world.rank())] =
          static_cast<std::size_t>(rows) * kHidden * sizeof(float);
    });
    double const copy = memcpy_seconds(moved);
    lib += seconds;
    ref += copy;
    state.SetIterationTime(seconds);
  }
  state.counters["ratio_copy_to_dispatch_combine"] = ref / lib;
}
BENCHMARK(BM_DispatchCombine)
    ->ArgNames({"zipf", "dedup", "peer"})
    ->ArgsProduct({{0, 1}, {0, 1}, {1, 0}})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
