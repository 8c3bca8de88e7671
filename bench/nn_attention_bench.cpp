// Attention (nn/attention.hpp) on the CPU:
//  * BM_AttentionForwardBackward: forward + backward tokens per second on one rank, and the
//    achieved GEMM FLOP rate as a ratio to one dense GEMM of equal FLOPs measured in the same
//    run (the attention's QKV, score, context and projection GEMMs, forward and backward).
//  * BM_AttentionCausal: the same at S 1024 with head dimension 64 (4 heads, 2 KV groups,
//    H 64, B 1), counting the causal core FLOPs as Megatron does, 4·S²·d/2 per head forward and
//    2.5× that backward, plus the QKV and projection GEMMs; ratio to a dense GEMM of equal FLOPs
//    in the same run. `core_share` is the core's part of the counted FLOPs.
//  * BM_ContextParallelExchange: one forward + backward on CP ranks of the in-process world; the
//    bytes the K/V exchange moves over `cp` (from the communicator's traffic counters) as a
//    ratio to the causal minimum (context_parallel.hpp), and tokens per second of the world.
//
//   build/bin/bench_nn_attention --benchmark_counters_tabular=true

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/core/init.hpp"
#include "moefold/exec/blas.hpp"
#include "moefold/nn/attention.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using Comm = moefold::inproc::Communicator;

constexpr std::int64_t kHidden = 256, kHeads = 8, kGroups = 4, kBatch = 2;

moefold::AttentionConfig config() {
  return {.hidden = kHidden, .heads = kHeads, .kv_groups = kGroups, .seed = 1};
}

std::vector<float> input(std::size_t n) {
  std::vector<float> x(n);
  moefold::init_rows(std::span<float>(x), 3, "x", static_cast<std::int64_t>(n), 0,
                     moefold::InitDist::uniform, 1.0);
  return x;
}

/// GEMM FLOPs of one attention forward + backward on one rank (every GEMM of the forward has
/// two of equal size in the backward; the score and context GEMMs cover the full S×S block).
double attention_flops(std::int64_t seq) {
  double const t = double(seq * kBatch), d = double(kHidden / kHeads);
  double const qkv = 2 * t * kHidden * double(kGroups * (kHeads / kGroups + 2)) * d;
  double const core = 2 * 2 * double(kBatch * kHeads) * double(seq) * double(seq) * d;
  double const proj = 2 * t * double(kHeads) * d * kHidden;
  return 3 * (qkv + core + proj);
}

/// Seconds per call of a square float GEMM with about `flops` FLOPs.
double dense_gemm_seconds(double flops, int calls) {
  auto const n = static_cast<std::int64_t>(std::cbrt(flops / 2));
  auto const a = input(static_cast<std::size_t>(n * n));
  std::vector<float> c(a.size());
  moefold::gemm<float>(moefold::Trans::no, moefold::Trans::no, n, n, n, 1.f, a.data(), n, a.data(),
                       n, 0.f, c.data(), n);  // warm-up
  auto const t0 = Clock::now();
  for (int i = 0; i < calls; ++i) {
    moefold::gemm<float>(moefold::Trans::no, moefold::Trans::no, n, n, n, 1.f, a.data(), n,
                         a.data(), n, 0.f, c.data(), n);
    benchmark::ClobberMemory();
  }
  double const s = std::chrono::duration<double>(Clock::now() - t0).count() / calls;
  return s * flops / (2.0 * double(n) * double(n) * double(n));  // scaled to exactly `flops`
}

/// Seconds of the benchmark's forward + backward iterations on `attn` (one rank).
template <class Attn>
double time_forward_backward(benchmark::State& state, Attn& attn, std::vector<float> const& x,
                             std::vector<float> const& dy, std::int64_t batch) {
  double seconds = 0;
  for (auto _ : state) {
    auto const t0 = Clock::now();
    auto y = attn.forward(std::span<float const>(x), batch);
    auto dx = attn.backward(std::span<float const>(dy));
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
    double const s = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(s);
    seconds += s;
  }
  return seconds;
}

void BM_AttentionForwardBackward(benchmark::State& state) {
  std::int64_t const seq = state.range(0);
  auto const x = input(static_cast<std::size_t>(seq * kBatch * kHidden));
  auto const dy = input(x.size());
  double seconds = 0;
  moefold::inproc::run(1, [&](Comm& world) {
    moefold::ProcessGroups<Comm> groups(moefold::FoldedMapping::from({.world = 1}), world);
    moefold::cpu::Attention<float, Comm> attn(config(), groups.tp(), groups.cp());
    seconds = time_forward_backward(state, attn, x, dy, kBatch);
  });
  double const iters = static_cast<double>(state.iterations());
  double const flops = attention_flops(seq);
  double const achieved = iters * flops / seconds;
  double const reference = flops / dense_gemm_seconds(flops, 3);
  state.counters["tokens_per_s"] = iters * double(seq * kBatch) / seconds;
  state.counters["GFLOPs"] = achieved / 1e9;
  state.counters["gemm_GFLOPs"] = reference / 1e9;
  state.counters["ratio_to_gemm"] = achieved / reference;
}
BENCHMARK(BM_AttentionForwardBackward)
    ->Arg(256)
    ->Arg(1024)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// One core-dominated shape: S 1024, head dim 64, GQA 4 heads / 2 groups, H 64, B 1.
constexpr std::int64_t kCausalHidden = 64, kCausalHeads = 4, kCausalGroups = 2, kCausalDim = 64;

/// Counted FLOPs of the causal shape: the core's 4·S²·d/2 per head forward and 2.5× backward,
/// the linear layers' GEMMs forward and two of each backward.
struct CausalFlops {
  double core = 0, linear = 0;
};
CausalFlops causal_flops(std::int64_t seq) {
  double const t = double(seq), d = double(kCausalDim), h = double(kCausalHidden);
  double const qkv = 2 * t * h * double(kCausalGroups * (kCausalHeads / kCausalGroups + 2)) * d;
  double const proj = 2 * t * double(kCausalHeads) * d * h;
  double const core_fwd = double(kCausalHeads) * 4 * t * t * d / 2;
  return {.core = 3.5 * core_fwd, .linear = 3 * (qkv + proj)};
}

void BM_AttentionCausal(benchmark::State& state) {
  std::int64_t const seq = state.range(0);
  auto const x = input(static_cast<std::size_t>(seq * kCausalHidden));
  auto const dy = input(x.size());
  double seconds = 0;
  moefold::inproc::run(1, [&](Comm& world) {
    moefold::ProcessGroups<Comm> groups(moefold::FoldedMapping::from({.world = 1}), world);
    moefold::cpu::Attention<float, Comm> attn({.hidden = kCausalHidden,
                                               .heads = kCausalHeads,
                                               .kv_groups = kCausalGroups,
                                               .head_dim = kCausalDim,
                                               .seed = 1},
                                              groups.tp(), groups.cp());
    seconds = time_forward_backward(state, attn, x, dy, 1);
  });
  auto const f = causal_flops(seq);
  double const flops = f.core + f.linear;
  double const achieved = static_cast<double>(state.iterations()) * flops / seconds;
  double const reference = flops / dense_gemm_seconds(flops, 3);
  state.counters["GFLOPs"] = achieved / 1e9;
  state.counters["gemm_GFLOPs"] = reference / 1e9;
  state.counters["ratio_to_gemm"] = achieved / reference;
  state.counters["core_share"] = f.core / flops;
}
BENCHMARK(BM_AttentionCausal)->Arg(1024)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_ContextParallelExchange(benchmark::State& state) {
  int const cp = static_cast<int>(state.range(0));
  std::int64_t const seq = state.range(1);
  auto const x = input(static_cast<std::size_t>(seq * kBatch * kHidden));
  auto const dy = input(x.size());
  double seconds = 0;
  std::uint64_t moved = 0;
  for (auto _ : state) {
    double world_seconds = 0;
    std::vector<std::uint64_t> received(static_cast<std::size_t>(cp));
    moefold::inproc::run(cp, [&](Comm& world) {
      moefold::ProcessGroups<Comm> groups(moefold::FoldedMapping::from({.world = cp, .cp = cp}),
                                          world);
      auto const shard = moefold::SequenceShard::of(groups, seq, kBatch);
      moefold::cpu::Attention<float, Comm> attn(config(), groups.tp(), groups.cp());
      auto const xl = shard.extract(std::span<float const>(x), kHidden);
      auto const gl = shard.extract(std::span<float const>(dy), kHidden);
      groups.cp().reset_traffic();
      world.barrier();
      auto const t0 = Clock::now();
      auto y = attn.forward(std::span<float const>(xl), kBatch);
      auto dx = attn.backward(std::span<float const>(gl));
      benchmark::DoNotOptimize(dx.data());
      world.barrier();
      if (world.rank() == 0)
        world_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      received[static_cast<std::size_t>(world.rank())] = groups.cp().traffic().total_received();
    });
    state.SetIterationTime(world_seconds);
    seconds += world_seconds;
    moved = 0;
    for (auto r : received) moved += r;
  }
  // Minimum: each rank receives the K and V chunks its queries need and it does not hold
  // (forward), and sends back their gradients (backward).
  auto const chunks = moefold::cp_exchange_chunks(cp);
  double const chunk_bytes = double(seq / (2 * cp) * kBatch * kGroups * (kHidden / kHeads)) * 4;
  double const minimum = 2 /*K,V*/ * 2 /*fwd,bwd*/ * double(chunks.minimum) * chunk_bytes;
  state.counters["cp_bytes_moved"] = double(moved);
  state.counters["cp_bytes_min"] = minimum;
  state.counters["ratio_to_min"] = double(moved) / minimum;
  state.counters["tokens_per_s"] =
      static_cast<double>(state.iterations()) * double(seq * kBatch) / seconds;
}
BENCHMARK(BM_ContextParallelExchange)
    ->Args({2, 1024})
    ->Args({4, 1024})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
