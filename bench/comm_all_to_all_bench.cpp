// all_to_all_v on the in-process world, 8 ranks, as a ratio to memcpy bandwidth: inside the
// same world, right after the collectives, the same 8 rank threads each memcpy the bytes they
// received from other ranks, as often, timed between the same barriers — so both sides of the
// ratio see the same threads, cores and machine load (the in-process backend moves data with
// memcpy, so 1.0 is its physical ceiling). Cases: 1 KB, 64 KB and 1 MB per peer; the blocking
// all_to_all_v, the started one (`start_all_to_all_v` → `wait`), and `exchange_view` with a
// callback that copies the viewed blocks out (the same bytes as all_to_all_v).
//
//   build/bin/bench_comm_all_to_all --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "moefold/comm/inproc/run.hpp"

namespace {

constexpr int kRanks = 8;
constexpr int kCallsPerWorld = 20;

using Clock = std::chrono::steady_clock;
enum class Form { blocking, started, view };

/// One exchange of `form`: every rank sends `send.size() / kRanks` floats to every rank.
void exchange(moefold::inproc::Communicator& c, Form form, std::vector<float> const& send,
              std::vector<std::int64_t> const& counts, std::vector<float>& recv) {
  std::span<float const> const s(send);
  std::span<std::int64_t const> const n(counts);
  if (form == Form::blocking) {
    c.all_to_all_v(s, n, std::span<float>(recv), n);
  } else if (form == Form::started) {
    auto h = c.start_all_to_all_v(s, n, std::span<float>(recv), n);
    h.wait();
  } else {
    c.exchange_view(s, n, n, [&](std::span<std::span<float const> const> blocks) {
      float* out = recv.data();
      for (auto b : blocks) {
        std::memcpy(out, b.data(), b.size_bytes());
        out += b.size();
      }
    });
  }
}

void BM_InprocAllToAllV(benchmark::State& state, Form form) {
  auto const per_peer = static_cast<std::size_t>(state.range(0));
  std::size_t const moved_per_rank = per_peer * (kRanks - 1) * sizeof(float);  // crosses ranks
  double world_seconds = 0, memcpy_seconds = 0;
  for (auto _ : state) {
    double seconds = 0, copy_seconds = 0;
    moefold::inproc::run(kRanks, [&](moefold::inproc::Communicator& c) {
      std::vector<float> send(per_peer * kRanks, static_cast<float>(c.rank()));
      std::vector<float> recv(per_peer * kRanks);
      std::vector<std::int64_t> counts(kRanks, static_cast<std::int64_t>(per_peer));
      exchange(c, form, send, counts, recv);  // warm
      c.barrier();
      auto const t0 = Clock::now();
      for (int k = 0; k < kCallsPerWorld; ++k) exchange(c, form, send, counts, recv);
      c.barrier();
      auto const t1 = Clock::now();
      // The reference: the same threads memcpy the bytes they received from other ranks.
      for (int k = 0; k < kCallsPerWorld; ++k) {
        std::memcpy(recv.data(), send.data(), moved_per_rank);
        benchmark::ClobberMemory();
      }
      c.barrier();
      if (c.rank() == 0) {
        seconds = std::chrono::duration<double>(t1 - t0).count();
        copy_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
      }
    });
    state.SetIterationTime(seconds / kCallsPerWorld);
    world_seconds += seconds;
    memcpy_seconds += copy_seconds;
  }
  double const bytes = static_cast<double>(state.iterations()) * kCallsPerWorld * kRanks *
                       static_cast<double>(moved_per_rank);
  // One benchmark iteration is one call (manual time is per call).
  state.SetBytesProcessed(state.iterations() * kRanks * static_cast<std::int64_t>(moved_per_rank));
  state.counters["world_GBps"] = bytes / world_seconds / 1e9;
  state.counters["memcpy_GBps"] = bytes / memcpy_seconds / 1e9;
  state.counters["ratio_to_memcpy"] = memcpy_seconds / world_seconds;
}

void sizes(benchmark::internal::Benchmark* b) {
  b->Arg(256)->Arg(16 * 1024)->Arg(256 * 1024)->UseManualTime()->Unit(benchmark::kMicrosecond);
}
BENCHMARK_CAPTURE(BM_InprocAllToAllV, blocking, Form::blocking)->Apply(sizes);
BENCHMARK_CAPTURE(BM_InprocAllToAllV, started, Form::started)->Apply(sizes);
BENCHMARK_CAPTURE(BM_InprocAllToAllV, exchange_view, Form::view)->Apply(sizes);

}  // namespace

BENCHMARK_MAIN();
