// MFU (train/mfu.hpp): the ratio of the achieved model FLOP/s per rank to a measured GEMM rate,
// checked against hand-computed figures; the measured rate is a finite positive FLOP/s that a
// real GEMM of that size reaches; bad inputs are named.

#include <cmath>

#include "moefold/plan/flops.hpp"
#include "moefold/train/mfu.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;

TEST_CASE("MFU divides the model FLOPs per rank-second by the measured GEMM rate", "[train][mfu]") {
  // 8 ranks, 4e12 model FLOPs in 2 s: 2.5e11 FLOP/s per rank; against 1e12 per rank: 25%.
  Mfu const m = mfu(4e12, 2.0, 8, 1e12);
  CHECK(m.flops_per_rank == Approx(2.5e11));
  CHECK(m.peak_per_rank == 1e12);
  CHECK(m.ratio == Approx(0.25));
  CHECK_THROWS_WITH(mfu(1.0, 0.0, 8, 1e12), Catch::Contains("seconds 0"));
  CHECK_THROWS_WITH(mfu(1.0, 1.0, 0, 1e12), Catch::Contains("ranks 0"));
}

TEST_CASE("the measured GEMM rate is that of real GEMMs on the instance", "[train][mfu]") {
  test::Exec const exec;
  double const peak = gemm_peak_flops(exec, 64, 3);
  int syncs = 0;
  CHECK(gemm_peak_flops(exec, 32, 2, [&] { ++syncs; }) > 0);
  CHECK(syncs == 2);  // before and after the timed GEMMs
  CHECK(std::isfinite(peak));
  // Above 1 MFLOP/s (any machine that runs the tests) and below 100 TFLOP/s (no CPU core).
  CHECK(peak > 1e6);
  CHECK(peak < 1e14);
  CHECK_THROWS_WITH(gemm_peak_flops(exec, 0, 3), Catch::Contains("n = 0"));
}

TEST_CASE("the demo model's FLOPs per step follow Megatron's formula term by term",
          "[train][mfu]") {
  // One layer, h 128, 8 heads / 4 groups, 8 experts top-2 of FFN 256, V 256, s 64, B 16:
  // 12·B·s·L·h²·[(1 + g/a + s/h)·(a·d/h) + (F/h)·k·3/2 + V/(2·L·h)].
  ModelSpec m;
  m.num_layers = 1;
  m.hidden_size = 128;
  m.num_attention_heads = 8;
  m.num_query_groups = 4;
  m.moe_ffn_hidden_size = 256;
  m.num_experts = 8;
  m.moe_router_topk = 2;
  m.vocab_size = 256;
  double const bracket = (1.0 + 0.5 + 0.5) * 1.0 + 2.0 * 2 * 1.5 + 256.0 / (2 * 128);
  CHECK(megatron_flops_per_step(m, 16, 64) == Approx(12.0 * 16 * 64 * 128 * 128 * bracket));
}
