// all_to_all_v on the in-process world, 8 ranks, as a ratio of achieved bytes per second to
// memcpy bandwidth measured in the same run over the same bytes with the same thread count
// (the in-process backend moves data with memcpy, so 1.0 is its physical ceiling).
//
//   build/bin/bench_comm_all_to_all --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <thread>
#include <vector>

#include "moefold/comm/inproc/run.hpp"

namespace {

constexpr int kRanks = 8;
constexpr int kCallsPerWorld = 20;

using Clock = std::chrono::steady_clock;

/// Seconds for `kRanks` threads to each memcpy `bytes` bytes `calls` times.
double memcpy_seconds(std::size_t bytes, int calls) {
  std::vector<std::vector<std::byte>> src(kRanks, std::vector<std::byte>(bytes, std::byte{1}));
  std::vector<std::vector<std::byte>> dst(kRanks, std::vector<std::byte>(bytes));
  // Timed between two barriers, like the all-to-all, so thread start-up is not counted.
  std::barrier sync(kRanks);
  double seconds = 0;
  std::vector<std::thread> threads;
  for (int r = 0; r < kRanks; ++r)
    threads.emplace_back([&, r] {
      sync.arrive_and_wait();
      auto const t0 = Clock::now();
      for (int c = 0; c < calls; ++c) {
        std::memcpy(dst[static_cast<std::size_t>(r)].data(), src[static_cast<std::size_t>(r)].data(), bytes);
        benchmark::ClobberMemory();
      }
      sync.arrive_and_wait();
      if (r == 0) seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    });
  for (auto& t : threads) t.join();
  return seconds;
}

/// Each rank sends `per_peer` floats to every other rank (and keeps its own slice).
void BM_InprocAllToAllV(benchmark::State& state) {
  auto const per_peer = static_cast<std::size_t>(state.range(0));
  std::size_t const moved_per_rank = per_peer * (kRanks - 1) * sizeof(float);  // crosses ranks
  double total_seconds = 0;
  for (auto _ : state) {
    double seconds = 0;
    moefold::inproc::run(kRanks, [&](moefold::inproc::Communicator& c) {
      std::vector<float> send(per_peer * kRanks, static_cast<float>(c.rank()));
      std::vector<float> recv(per_peer * kRanks);
      std::vector<std::int64_t> counts(kRanks, static_cast<std::int64_t>(per_peer));
      c.barrier();
      auto const t0 = Clock::now();
      for (int k = 0; k < kCallsPerWorld; ++k)
        c.all_to_all_v(std::span<float const>(send), std::span<std::int64_t const>(counts),
                       std::span<float>(recv), std::span<std::int64_t const>(counts));
      c.barrier();
      if (c.rank() == 0) seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    });
    state.SetIterationTime(seconds / kCallsPerWorld);
    total_seconds += seconds;
  }
  double const calls = static_cast<double>(state.iterations()) * kCallsPerWorld;
  double const achieved = calls * kRanks * static_cast<double>(moved_per_rank) / total_seconds;
  double const reference =
      static_cast<double>(kCallsPerWorld) * kRanks * static_cast<double>(moved_per_rank) /
      memcpy_seconds(moved_per_rank, kCallsPerWorld);
  // One benchmark iteration is one call (manual time is per call).
  state.SetBytesProcessed(state.iterations() * kRanks * static_cast<std::int64_t>(moved_per_rank));
  state.counters["world_GBps"] = achieved / 1e9;
  state.counters["memcpy_GBps"] = reference / 1e9;
  state.counters["ratio_to_memcpy"] = achieved / reference;
}
BENCHMARK(BM_InprocAllToAllV)
    ->Arg(256)
    ->Arg(16 * 1024)
    ->Arg(256 * 1024)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
