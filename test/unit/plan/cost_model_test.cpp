// The cost model: placements come from the mesh algebra, each term responds to the shape that
// drives it, and the totals are consistent (MFU, tokens/s, memory).

#include <string>

#include "moefold/plan/cost_model.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"

using namespace moefold;

namespace {
using moefold::test::error_of;
Workload const paper_mixtral{.gpus = 128, .global_batch_size = 256, .seq_length = 4096};
ParallelConfig const paper_fold{.tp = 2, .pp = 8, .ep = 8, .etp = 1};
}  // namespace

TEST_CASE("placements are computed from the folding's groups") {
  // W=16, 8 GPUs per node, TP2 PP2 / EP8 ETP1: the EP group is one stage, one node.
  auto const a = place(FoldedMapping::from({.world = 16, .tp = 2, .pp = 2, .ep = 8, .etp = 1}), 8);
  CHECK(a.ep.size == 8);
  CHECK(a.ep.intra_node());
  CHECK(a.tp.intra_node());
  CHECK(a.pp.size == 2);
  CHECK(a.pp.nodes == 2);  // stages are W/PP = 8 ranks apart
  CHECK(a.pp.ranks_per_node == 1);
  CHECK(a.etp.size == 1);
  // W=32, TP2 PP2 / EP8 ETP2 (ETP = TP): EP has stride 2 and spans two nodes, 4 ranks on each.
  auto const b = place(FoldedMapping::from({.world = 32, .tp = 2, .pp = 2, .ep = 8, .etp = 2}), 8);
  CHECK(b.ep.size == 8);
  CHECK(b.ep.nodes == 2);
  CHECK(b.ep.ranks_per_node == 4);
  CHECK(b.etp.intra_node());
  // The same folding on 16-GPU nodes keeps EP inside a node.
  auto const c = place(FoldedMapping::from({.world = 32, .tp = 2, .pp = 2, .ep = 8, .etp = 2}), 16);
  CHECK(c.ep.intra_node());
  // dp_cp of TP2 CP2 DP2 PP2: {0,2,4,6} lies in one node.
  auto const d = place(FoldedMapping::from({.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 4}), 8);
  CHECK(d.dp_cp.size == 4);
  CHECK(d.dp_cp.intra_node());
}

TEST_CASE("the pre-folding rule: ETP = TP and EP divides DP·CP") {
  CHECK_FALSE(is_folded(2, 1, 8, 4, 2));  // the paper's MCore Mixtral row
  CHECK(is_folded(2, 1, 8, 8, 1));        // the folding row: ETP 1 != TP 2
  CHECK(is_folded(2, 1, 2, 4, 2));        // EP 4 does not divide DP·CP = 2
  CHECK_FALSE(is_folded(2, 4, 2, 4, 2));  // ... but divides DP·CP = 8 (Table 5's MCore rows)
}

TEST_CASE("MFU, throughput and step time are consistent") {
  Estimate const e = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, paper_fold);
  CHECK(e.dp == 8);
  CHECK(e.edp == 2);
  CHECK(e.folded);
  CHECK(e.microbatches == 32);
  CHECK(e.flops_per_step == Approx(megatron_flops_per_step(mixtral_8x22b(), 256, 4096, 2)));
  CHECK(e.mfu == Approx(e.flops_per_step / (e.step_time_s * 128 * 989.5e12)));
  CHECK(e.tokens_per_s_per_gpu == Approx(256.0 * 4096 / (e.step_time_s * 128)));
  CHECK(e.mfu > 0.2);
  CHECK(e.mfu < 0.8);
  // The step is at least the compute on the critical path plus the bubble.
  auto const& t = e.time;
  CHECK(e.step_time_s >= t.attention_gemm + t.expert_gemm + t.core_attention + t.bubble);
  // Mixtral TP2 EP8 ETP1: no ETP traffic, no CP traffic.
  CHECK(t.etp == 0);
  CHECK(t.cp == 0);
  CHECK(t.ep > 0);
}

TEST_CASE("ETP adds all-gather/reduce-scatter traffic that EP alone does not have") {
  auto const fold = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, paper_fold);
  auto const mcore = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral,
                              {.tp = 2, .pp = 8, .ep = 4, .etp = 2});
  CHECK_FALSE(mcore.folded);
  CHECK(mcore.time.etp > 0);
  CHECK(mcore.step_time_s > fold.step_time_s);
  // Same experts per GPU (EP·ETP = 8), so the same expert weights per GPU.
  CHECK(mcore.memory.weights == Approx(fold.memory.weights));
}

TEST_CASE("an EP group that leaves the node costs more than one inside NVLink") {
  ParallelConfig const c{.tp = 2, .pp = 8, .ep = 8, .etp = 2};  // EP stride 2: 16 ranks
  auto const on8 = estimate(mixtral_8x22b_g8t8(), h100_cluster(), paper_mixtral, c);
  CHECK(on8.placement.ep.nodes == 2);
  ClusterSpec big = h100_cluster();
  big.gpus_per_node = 16;
  auto const on16 = estimate(mixtral_8x22b_g8t8(), big, paper_mixtral, c);
  CHECK(on16.placement.ep.intra_node());
  CHECK(on8.time.ep > 2 * on16.time.ep);
}

TEST_CASE("skinny expert GEMMs are less efficient: fine-grained experts cost more per FLOP") {
  // G8T8 does half of Mixtral's routed FLOPs, with 8x narrower experts.
  auto const coarse = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, paper_fold);
  auto const fine = estimate(mixtral_8x22b_g8t8(), h100_cluster(), paper_mixtral, paper_fold);
  CHECK(fine.time.expert_gemm > 0.5 * coarse.time.expert_gemm);
}

TEST_CASE("memory: PP and EP shard weights, the distributed optimizer shards over dp_cp/edp") {
  auto const pp8 = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, paper_fold);
  auto const pp4 = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral,
                            {.tp = 2, .pp = 4, .ep = 8, .etp = 1});
  CHECK(pp4.memory.weights == Approx(2 * pp8.memory.weights).epsilon(0.05));
  // Weights BF16 (2 B), gradients FP32 (4 B).
  CHECK(pp8.memory.gradients == Approx(2 * pp8.memory.weights));
  // Optimizer: 12 B per parameter, experts sharded over EDP = 2.
  double const expert_params = 7 * mixtral_8x22b().params_per_expert();
  CHECK(pp8.memory.optimizer > 12 * expert_params / 2);
  CHECK(pp8.memory.optimizer < 12 * expert_params / 2 * 1.1);
  // Paper configuration fits an 80 GB H100.
  CHECK(pp8.fits);
  CHECK(pp8.memory.total() < 80e9);
}

TEST_CASE("full recompute trades time for activation memory") {
  ParallelConfig keep = paper_fold;
  ParallelConfig full = paper_fold;
  full.recompute = Recompute::full;
  auto const a = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, keep);
  auto const b = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, full);
  CHECK(b.memory.activations < a.memory.activations / 4);
  CHECK(b.memory.activations == Approx(a.memory.activations_with_recompute));
  CHECK(b.time.recompute > 0);
  CHECK(b.step_time_s > a.step_time_s * 1.15);
}

TEST_CASE("interleaving shrinks the bubble and holds more activations") {
  ParallelConfig vpp7 = paper_fold;
  vpp7.vpp = 7;
  auto const a = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, paper_fold);
  auto const b = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, vpp7);
  CHECK(b.time.bubble < a.time.bubble / 5);
  CHECK(b.memory.activations_without_recompute > a.memory.activations_without_recompute);
}

TEST_CASE("a bigger global batch amortizes the bubble") {
  Workload big = paper_mixtral;
  big.global_batch_size = 1024;
  auto const a = estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, paper_fold);
  auto const b = estimate(mixtral_8x22b(), h100_cluster(), big, paper_fold);
  CHECK(b.mfu > a.mfu);
  CHECK(b.time.bubble == Approx(a.time.bubble));
}

TEST_CASE("H200 memory lets a configuration fit that does not fit an H100") {
  ParallelConfig const c{.tp = 2, .pp = 4, .ep = 8, .etp = 1};
  CHECK_FALSE(estimate(mixtral_8x22b(), h100_cluster(), paper_mixtral, c).fits);
  CHECK(estimate(mixtral_8x22b(), h200_cluster(), paper_mixtral, c).fits);
}

TEST_CASE("shapes a model cannot run are rejected with the rule and the numbers") {
  ModelSpec const m = mixtral_8x22b();
  auto why = [&](ParallelConfig const& c, Workload const& w = paper_mixtral) {
    return error_of([&] { estimate(m, h100_cluster(), w, c); });
  };
  CHECK(why({.tp = 32, .pp = 4, .ep = 8, .etp = 1}) ==
        "num_attention_heads (48) is not divisible by TP (32)");
  CHECK(why({.tp = 2, .pp = 8, .ep = 16, .etp = 1}) ==
        "num_experts (8) is not divisible by EP (16)");
  CHECK(why({.tp = 2, .pp = 16, .ep = 8, .etp = 1}) ==
        "num_layers (56) is not divisible by PP (16)");
  CHECK(why({.tp = 2, .pp = 8, .vpp = 2, .ep = 8, .etp = 1}) ==
        "layers per pipeline stage (7) are not divisible by VPP (2)");
  CHECK(why({.tp = 2, .pp = 8, .ep = 8, .etp = 1, .micro_batch_size = 3}) ==
        "global_batch_size (256) is not divisible by micro_batch_size·DP = 3·8");
  CHECK(why({.tp = 2, .pp = 8, .ep = 8, .etp = 1},
            {.gpus = 128, .global_batch_size = 256, .seq_length = 4097}) ==
        "seq_length (4097) is not divisible by TP·CP = 2");
  // The folding rules come from FoldedMapping.
  CHECK(why({.tp = 2, .pp = 8, .ep = 8, .etp = 1}, {.gpus = 120, .global_batch_size = 240})
            .find("world_size (120) is not divisible by model_size TP·PP·CP = 16") !=
        std::string::npos);
}
