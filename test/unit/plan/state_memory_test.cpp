// The model state per rank (state_memory.hpp, `stage_params`, `state_per_stage`): bytes per
// element under each precision, sharding over dp_cp / edp and the intra-partial groups, the
// buckets' padding, moefold's reduced-shard buffers, and the demo model's parameters per stage
// counted by hand from the layers DecoderStage builds.

#include <string>

#include "moefold/plan/cost_model.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"

using namespace moefold;
using moefold::test::error_of;

namespace {

StatePolicy const fp32_replicated{.bf16 = false, .use_distributed_optimizer = false};
StatePolicy const bf16_replicated{.bf16 = true, .use_distributed_optimizer = false};
StatePolicy const fp32_sharded{.bf16 = false, .use_distributed_optimizer = true};
StatePolicy const bf16_sharded{};  // the paper's runs: BF16, distributed optimizer, Megatron

/// moefold-train's default model (examples/plan/moefold-train-demo.json).
ModelSpec demo() {
  return {.name = "demo",
          .num_layers = 4,
          .hidden_size = 128,
          .num_attention_heads = 8,
          .num_query_groups = 4,
          .moe_ffn_hidden_size = 256,
          .num_experts = 8,
          .moe_router_topk = 2,
          .vocab_size = 256,
          .seq_length = 64,
          .make_vocab_size_divisible_by = 1};
}

}  // namespace

TEST_CASE("bytes per element: FP32 4/4/8, BF16 2/4/12, without the distributed optimizer") {
  StageParams const p{.non_expert = 1000, .expert = 3000};
  StateBytes const f = state_bytes(p, 4, 2, fp32_replicated);
  CHECK(f.weights == 4 * 4000);
  CHECK(f.gradients == 4 * 4000);
  CHECK(f.optimizer == 8 * 4000);
  StateBytes const b = state_bytes(p, 4, 2, bf16_replicated);
  CHECK(b.weights == 2 * 4000);
  CHECK(b.gradients == 4 * 4000);
  CHECK(b.optimizer == 12 * 4000);
  CHECK(b.total() == 18 * 4000);
}

TEST_CASE(
    "the distributed optimizer shards non-expert state over dp_cp and expert state over "
    "edp, padded to lcm(shards, 128)") {
  // Multiples of 128·shards: exact fractions.
  StageParams const p{.non_expert = 128 * 4 * 10, .expert = 128 * 2 * 7};
  StateBytes const s = state_bytes(p, 4, 2, fp32_sharded);
  CHECK(s.optimizer == 8 * (128 * 10 + 128 * 7));
  CHECK(s.weights == 4 * p.total());
  CHECK(s.gradients == 4 * p.total());  // Megatron: no extra buffer
  CHECK(state_bytes(p, 4, 2, bf16_sharded).optimizer == 12 * (128 * 10 + 128 * 7));
  // 1000 elements over 3 shards: padded to 1152 (lcm 384), 384 per shard; over 1 shard the
  // largest rank keeps the 1000 elements, not the padding.
  CHECK(shard_elements(1000, 3) == 384);
  CHECK(state_bytes({.non_expert = 1000}, 3, 1, fp32_sharded).optimizer == 8 * 384);
  CHECK(state_bytes({.non_expert = 1000}, 1, 1, fp32_sharded).optimizer == 8 * 1000);
  // Two optimizer instances: shards within groups half as large, twice the state.
  StatePolicy two = fp32_sharded;
  two.num_distributed_optimizer_instances = 2;
  CHECK(state_bytes(p, 4, 2, two).optimizer == 8 * (128 * 20 + 128 * 14));
}

TEST_CASE("moefold's distributed optimizer adds a padded FP32 gradient shard per buffer") {
  StatePolicy moefold = fp32_sharded;
  moefold.runtime = Runtime::moefold;
  StateBytes const s = state_bytes({.non_expert = 1000, .expert = 512}, 3, 2, moefold);
  CHECK(s.gradients == 4 * (1512 + 384 + 256));
  CHECK(s.optimizer == 8 * (384 + 256));
  // Without the distributed optimizer the runtime changes nothing.
  moefold.use_distributed_optimizer = false;
  CHECK(state_bytes({.non_expert = 1000}, 3, 2, moefold).gradients == 4000);
}

TEST_CASE("parameters per stage are the layers DecoderStage builds (demo model, by hand)") {
  ModelSpec const m = demo();
  // TP2 PP2 EP2 ETP1. Per layer: QKV (8 + 2·4)·16·128 / 2 = 16384, projection 128·128 / 2 = 8192,
  // two norms 256 and the router 8·128 = 1024 (replicated); 4 experts of 2·256·128 + 128·256.
  ParallelConfig const c{.tp = 2, .cp = 2, .pp = 2, .ep = 2, .etp = 1};
  double const layer = 16384 + 8192 + 256 + 1024, experts = 4 * 98304;
  StageParams const first = stage_params(m, c, 0), last = stage_params(m, c, 1);
  CHECK(first.non_expert == 2 * layer + 256 * 128 / 2);       // + embedding
  CHECK(last.non_expert == 2 * layer + 128 + 256 * 128 / 2);  // + final norm, output layer
  CHECK(first.expert == 2 * experts);
  CHECK(last.expert == 2 * experts);
  // PP 1: both ends on one stage; ETP 2 halves each expert.
  StageParams const one = stage_params(m, {.tp = 2, .pp = 1, .ep = 2, .etp = 2}, 0);
  CHECK(one.non_expert == 4 * layer + 128 + 2 * 256 * 128 / 2);
  CHECK(one.expert == 4 * experts / 2);
  // PP 4: middle stages hold their layer only.
  ParallelConfig const pp4{.tp = 1, .pp = 4, .ep = 2, .etp = 1};
  CHECK(stage_params(m, pp4, 1).non_expert == 2 * 16384 + 2 * 8192 + 256 + 1024);
  // moefold-train's memory.json for W8 TP2 CP2 PP2 EP2 ETP1, FP32, distributed optimizer, last
  // stage: 3418624 B of parameters, 5127936 B of gradients, 3418624 B of moments.
  Workload const w{.gpus = 8,
                   .global_batch_size = 16,
                   .seq_length = 64,
                   .state = {.bf16 = false, .runtime = Runtime::moefold}};
  auto const stages = state_per_stage(m, w, c);
  REQUIRE(stages.size() == 2);
  CHECK(stages[1].weights == 3418624);
  CHECK(stages[1].gradients == 5127936);
  CHECK(stages[1].optimizer == 3418624);
}

TEST_CASE("QKV bias and the vocabulary's padding count, a tied output layer only across stages") {
  ModelSpec m = demo();
  ParallelConfig const c{.tp = 2, .pp = 2, .ep = 2, .etp = 1};
  double const base = stage_params(m, c, 0).non_expert;
  m.add_qkv_bias = true;
  CHECK(stage_params(m, c, 0).non_expert == base + 2 * (8 + 2 * 4) * 16 / 2);
  m = demo();
  m.vocab_size = 300;  // padded to 512 with 128·TP
  m.make_vocab_size_divisible_by = 128;
  CHECK(stage_params(m, c, 0).non_expert == base + (512 - 256) * 128 / 2);
  m = demo();
  m.untie_embeddings = false;
  CHECK(stage_params(m, c, 1).non_expert == stage_params(demo(), c, 1).non_expert);
  ParallelConfig const one{.tp = 2, .pp = 1, .ep = 2, .etp = 1};
  CHECK(stage_params(m, one, 0).non_expert ==
        stage_params(demo(), one, 0).non_expert - 256 * 128 / 2);
}

TEST_CASE("the estimate follows the policy: FP32 without sharding holds the most") {
  Workload paper{.gpus = 128, .global_batch_size = 256, .seq_length = 4096};
  ParallelConfig const fold{.tp = 2, .pp = 8, .ep = 8, .etp = 1};
  auto const bf16 = estimate(mixtral_8x22b(), h100_cluster(), paper, fold);
  paper.state = fp32_replicated;
  auto const fp32 = estimate(mixtral_8x22b(), h100_cluster(), paper, fold);
  CHECK(fp32.memory.weights == Approx(2 * bf16.memory.weights));
  CHECK(fp32.memory.gradients == Approx(bf16.memory.gradients));
  CHECK(fp32.memory.optimizer == Approx(2 * fp32.memory.weights));  // 8 B vs 4 B
  CHECK(fp32.memory.activations == Approx(2 * bf16.memory.activations));
  CHECK_FALSE(fp32.fits);
  // Without sharding the gradients are all-reduced: more DP traffic, no parameter gather.
  CHECK(fp32.time.edp_raw > bf16.time.edp_raw);
}

TEST_CASE("optimizer instances must divide DP·CP and EDP and need the distributed optimizer") {
  ModelSpec const m = demo();
  Workload w{.gpus = 8, .global_batch_size = 16, .seq_length = 64};
  w.state.num_distributed_optimizer_instances = 2;
  // TP2 CP2 PP2: DP·CP 2, EP4: EDP 1.
  auto const why = error_of(
      [&] { estimate(m, h100_cluster(), w, {.tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 1}); });
  CHECK_THAT(why, Catch::Matchers::Contains("EDP = 1") &&
                      Catch::Matchers::Contains("num_distributed_optimizer_instances = 2"));
  CHECK_NOTHROW(estimate(m, h100_cluster(), w, {.tp = 1, .pp = 2, .ep = 2, .etp = 1}));
  w.state.use_distributed_optimizer = false;
  CHECK_THAT(
      error_of([&] { estimate(m, h100_cluster(), w, {.tp = 1, .pp = 2, .ep = 2, .etp = 1}); }),
      Catch::Matchers::Contains("needs the distributed optimizer"));
}
