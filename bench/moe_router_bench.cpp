// Router throughput at T = 16384, H = 1024, E = 64, top-8, fp32, one core: top-k selection
// alone (tokens/s, as a ratio to reading the logits with memcpy), and the full forward (logits
// GEMM + softmax + top-k + aux loss) as a ratio to the logits GEMM alone.
//
//   build/bin/bench_moe_router --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <cstring>

#include "moe_bench_support.hpp"
#include "moefold/comm/inproc/communicator.hpp"
#include "moefold/moe/router.hpp"

namespace {

using namespace moefold;
using namespace moefold::bench;

void BM_TopK(benchmark::State& state) {
  bool const zipf = state.range(0) != 0;
  auto logits = bench_tensor(static_cast<std::size_t>(kTokens * kExperts), 3);
  if (zipf)  // skew: lower experts get larger logits
    for (std::size_t i = 0; i < logits.size(); ++i)
      logits[i] -= 1.2f * std::log(static_cast<float>(i % kExperts) + 1.0f);
  std::vector<int> idx(static_cast<std::size_t>(kTokens * kTopK));
  std::vector<float> copy(logits.size());
  Cpu const exec;
  double lib = 0, ref = 0;
  for (auto _ : state) {
    auto const t0 = Clock::now();
    top_k<float>(exec, View<float const>(logits.data(), kTokens, kExperts),
                 View<int>(idx.data(), kTokens, kTopK));
    benchmark::ClobberMemory();
    auto const t1 = Clock::now();
    std::memcpy(copy.data(), logits.data(), logits.size() * sizeof(float));
    benchmark::ClobberMemory();
    auto const t2 = Clock::now();
    lib += std::chrono::duration<double>(t1 - t0).count();
    ref += std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["Mtokens_per_s"] = static_cast<double>(state.iterations()) * kTokens / lib / 1e6;
  state.counters["ratio_to_memcpy_logits"] = ref / lib;
}
BENCHMARK(BM_TopK)->ArgName("zipf")->Arg(0)->Arg(1)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_RouterForward(benchmark::State& state) {
  RouterConfig cfg{.num_experts = kExperts, .moe_router_topk = kTopK, .moe_aux_loss_coeff = {1e-2}};
  TopKRouter<Cpu, SoftmaxScore, float> router(cfg, kHidden);
  auto const w = bench_tensor(static_cast<std::size_t>(kExperts * kHidden), 4);
  std::copy(w.begin(), w.end(), router.weight().begin());
  auto const x = bench_tensor(static_cast<std::size_t>(kTokens * kHidden), 5);
  std::vector<float> logits(static_cast<std::size_t>(kTokens * kExperts));
  double lib = 0, ref = 0;
  for (auto _ : state) {
    auto const t0 = Clock::now();
    auto out = router.forward(std::span<float const>(x), kTokens);
    benchmark::DoNotOptimize(out.routing.probs.data());
    auto const t1 = Clock::now();
    gemm<float>(Trans::no, Trans::yes, kTokens, kExperts, kHidden, 1.0f, x.data(), kHidden,
                w.data(), kHidden, 0.0f, logits.data(), kExperts);
    benchmark::ClobberMemory();
    auto const t2 = Clock::now();
    lib += std::chrono::duration<double>(t1 - t0).count();
    ref += std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["ratio_gemm_to_forward"] = ref / lib;
}
BENCHMARK(BM_RouterForward)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
