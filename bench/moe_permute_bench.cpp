// Permute + weighted unpermute of T = 16384 tokens × H = 1024 (fp32), E = 64, top-8, on one
// core, as a ratio to memcpy of the same bytes in the same run: permute copies N = T·K rows,
// unpermute reads them back into T rows, so the reference is two memcpy of N·H floats.
// Target: ratio ≥ 0.7.
//
//   build/bin/bench_moe_permute --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <cstring>

#include "moe_bench_support.hpp"
#include "moefold/moe/permutation.hpp"

namespace {

using namespace moefold;
using namespace moefold::bench;

void BM_PermuteUnpermute(benchmark::State& state) {
  bool const zipf = state.range(0) != 0;
  auto const r = bench_routing(kTokens, zipf);
  Cpu const exec;
  auto const order = ExpertMajorOrder::of(exec, r);
  auto const probs = order.probs(r);
  auto const x = bench_tensor(static_cast<std::size_t>(kTokens * kHidden));
  std::vector<float> rows(static_cast<std::size_t>(order.tokens.rows() * kHidden));
  std::vector<float> y(x.size());
  auto const bytes = rows.size() * sizeof(float);
  std::vector<float> ref_src(rows.size(), 1.0f), ref_dst(rows.size());
  double lib = 0, ref = 0;
  for (auto _ : state) {
    auto const t0 = Clock::now();
    permute<float>(exec, order.tokens, x, rows, kHidden);
    unpermute<float>(exec, order.tokens, rows, y, kHidden, probs);
    benchmark::ClobberMemory();
    auto const t1 = Clock::now();
    std::memcpy(ref_dst.data(), ref_src.data(), bytes);
    std::memcpy(ref_src.data(), ref_dst.data(), bytes);
    benchmark::ClobberMemory();
    auto const t2 = Clock::now();
    lib += std::chrono::duration<double>(t1 - t0).count();
    ref += std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(2 * bytes));
  state.counters["rows"] = static_cast<double>(order.tokens.rows());
  state.counters["memcpy_GBps"] =
      2.0 * static_cast<double>(bytes) * static_cast<double>(state.iterations()) / ref / 1e9;
  state.counters["ratio_to_memcpy"] = ref / lib;
}
BENCHMARK(BM_PermuteUnpermute)
    ->ArgName("zipf")
    ->Arg(0)
    ->Arg(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

}  // namespace

BENCHMARK_MAIN();
