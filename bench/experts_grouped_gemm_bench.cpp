// GroupedGemmExperts forward+backward (8 local experts, H = 1024, F = 2048, SwiGLU, 16384 routed
// rows; token counts uniform or Zipf-skewed with exponent 1.2) as a ratio to one dense GEMM of
// the same total FLOPs, timed in the same run on the same thread.
//
//   build/bin/bench_experts_grouped_gemm --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/moe/grouped_gemm_experts.hpp"
#include "moefold/moe/moe_layer.hpp"

namespace {

constexpr int kExperts = 8;
constexpr std::int64_t kH = 1024, kF = 2048, kRows = 16384;

std::vector<std::int64_t> counts(bool zipf) {
  std::vector<std::int64_t> c(kExperts, kRows / kExperts);
  if (!zipf) return c;
  std::vector<double> w(kExperts);
  for (int i = 0; i < kExperts; ++i) w[static_cast<std::size_t>(i)] = 1.0 / std::pow(i + 1.0, 1.2);
  double const total = std::accumulate(w.begin(), w.end(), 0.0);
  std::int64_t assigned = 0;
  for (int i = 0; i < kExperts; ++i) {
    c[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(std::floor(kRows * w[static_cast<std::size_t>(i)] / total));
    assigned += c[static_cast<std::size_t>(i)];
  }
  c[0] += kRows - assigned;
  return c;
}

/// FLOPs of forward + backward: fc1 (2F wide) and fc2, each forward GEMM twice in backward.
constexpr double kFlops = 3.0 * (2.0 * kRows * kH * 2 * kF + 2.0 * kRows * kF * kH);

double dense_gemm_seconds() {
  // One GEMM of equal FLOPs: [rows, H] × [H, 9F].
  std::int64_t const n = 9 * kF;
  std::vector<float> a(static_cast<std::size_t>(kRows * kH), 0.5f), b(static_cast<std::size_t>(kH * n), 0.25f),
      c(static_cast<std::size_t>(kRows * n));
  auto const t0 = std::chrono::steady_clock::now();
  moefold::gemm<float>(moefold::Trans::no, moefold::Trans::no, kRows, n, kH, 1.f, a.data(), kH,
                       b.data(), n, 0.f, c.data(), n);
  benchmark::DoNotOptimize(c.data());
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void BM_GroupedExpertsFwdBwd(benchmark::State& state) {
  bool const zipf = state.range(0) != 0;
  auto const c = counts(zipf);
  moefold::GroupedGemmExperts<moefold::Cpu, moefold::SwiGLU, moefold::BlasGroupedGemm, float> experts(
      {.num_local_experts = kExperts, .hidden_size = kH, .ffn_hidden_size = kF}, 1);
  std::vector<float> x(static_cast<std::size_t>(kRows * kH), 0.01f), p(static_cast<std::size_t>(kRows), 0.5f),
      dy(static_cast<std::size_t>(kRows * kH), 0.02f);
  double seconds = 0;
  for (auto _ : state) {
    auto const t0 = std::chrono::steady_clock::now();
    auto y = experts.forward(x, p, c);
    auto g = experts.backward(dy);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(g.input.data());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  double const per_iter = seconds / static_cast<double>(state.iterations());
  double const dense = dense_gemm_seconds();
  state.counters["GFLOPs"] = kFlops / per_iter / 1e9;
  state.counters["dense_GFLOPs"] = kFlops / dense / 1e9;
  state.counters["ratio_to_dense"] = dense / per_iter;
  state.SetLabel(zipf ? "zipf-1.2" : "uniform");
}
BENCHMARK(BM_GroupedExpertsFwdBwd)->Arg(0)->Arg(1)->Iterations(2)->Unit(benchmark::kMillisecond);

/// The whole MoE layer (router, dispatcher, experts, combine) forward+backward on one rank, in
/// tokens per second: arguments (tokens, H, F), top-2 over 8 experts. (8192, 1024, 2048) is
/// 16384 routed rows of the experts' shape above; (16384, 512, 1024) is the shape of the
/// PyTorch side-by-side (bench/peers/peers.sh).
void BM_MoELayerFwdBwdOneRank(benchmark::State& state) {
  using Comm = moefold::inproc::Communicator;
  auto const fold = moefold::FoldedMapping::from({.world = 1});
  std::int64_t const tokens = state.range(0), h = state.range(1), f = state.range(2);
  moefold::MoELayerConfig cfg{.hidden_size = h, .moe_ffn_hidden_size = f};
  cfg.router.num_experts = kExperts;
  cfg.router.moe_router_topk = 2;
  double seconds = 0;
  moefold::inproc::run(1, [&](Comm& world) {
    moefold::ProcessGroups groups(fold, world);
    moefold::cpu::DefaultMoELayer<float, Comm> moe(cfg, groups);
    std::vector<float> x(static_cast<std::size_t>(tokens * h));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97) - 0.4f;
    for (auto _ : state) {
      auto const t0 = std::chrono::steady_clock::now();
      auto y = moe.forward(x);
      auto dx = moe.backward(y);
      benchmark::DoNotOptimize(dx.data());
      seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  });
  state.counters["tokens_per_s"] = static_cast<double>(tokens) * static_cast<double>(state.iterations()) / seconds;
}
BENCHMARK(BM_MoELayerFwdBwdOneRank)
    ->Args({kRows / 2, kH, kF})
    ->Args({16384, 512, 1024})
    ->Iterations(2)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
