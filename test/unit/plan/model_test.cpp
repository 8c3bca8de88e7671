// Model and cluster descriptions, and Megatron v0.10's FLOPs formula (spec/paper.md §4.11).

#include <string>

#include "moefold/plan/cluster.hpp"
#include "moefold/plan/flops.hpp"
#include "moefold/plan/model.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"

using namespace moefold;

namespace {
using moefold::test::error_of;
}  // namespace

TEST_CASE("the FLOPs formula gives the per-token figures of spec/paper.md §4.11") {
  // Per token = FLOPs of one sequence / s. The spec quotes 250.6, 87.1 and 149.2 GFLOP/token.
  auto per_token = [](ModelSpec const& m) { return megatron_flops_per_step(m, 1, 4096) / 4096; };
  CHECK(per_token(mixtral_8x22b()) / 1e9 == Approx(250.6).epsilon(0.001));
  CHECK(per_token(qwen2_57b_a14b()) / 1e9 == Approx(87.1).epsilon(0.002));
  CHECK(per_token(mixtral_8x22b_g8t8()) / 1e9 == Approx(149.2).epsilon(0.001));
  // Linear in the number of sequences.
  CHECK(megatron_flops_per_step(mixtral_8x22b(), 256, 4096) ==
        Approx(256 * megatron_flops_per_step(mixtral_8x22b(), 1, 4096)));
}

TEST_CASE("the FLOPs formula counts full attention: the s/h term grows with the sequence") {
  ModelSpec const m = mixtral_8x22b();
  double const at4k = megatron_flops_per_step(m, 1, 4096) / 4096;
  double const at8k = megatron_flops_per_step(m, 1, 8192) / 8192;
  // 12·L·h²·(Δs/h)·(a·d/h) = 12·L·Δs·a·d per token.
  CHECK(at8k - at4k == Approx(12.0 * 56 * 4096 * 48 * 128));
}

TEST_CASE("the vocabulary is padded to a multiple of 128·TP, as Megatron does") {
  CHECK(padded_vocab_size(32000, 1) == 32000);
  CHECK(padded_vocab_size(32000, 4) == 32256);
  CHECK(padded_vocab_size(151936, 2) == 152064);
  CHECK(padded_vocab_size(128256, 8) == 129024);
  CHECK(megatron_flops_per_step(mixtral_8x22b(), 1, 4096, 4) >
        megatron_flops_per_step(mixtral_8x22b(), 1, 4096, 1));
}

TEST_CASE("the presets have the paper's shapes and parameter counts") {
  ModelSpec const mixtral = model_preset("mixtral-8x22b");
  CHECK(mixtral.total_params() / 1e9 == Approx(141).epsilon(0.01));
  CHECK(mixtral.active_params() / 1e9 == Approx(39).epsilon(0.01));
  ModelSpec const qwen = model_preset("qwen2-57b-a14b");
  CHECK(qwen.total_params() / 1e9 == Approx(57).epsilon(0.01));
  CHECK(qwen.active_params() / 1e9 == Approx(14).epsilon(0.03));
  ModelSpec const g8t8 = model_preset("mixtral-8x22b-g8t8");
  // Fine-grained upcycling keeps the expert parameters and halves the routed compute.
  CHECK(g8t8.total_params() == Approx(mixtral.total_params()).epsilon(1e-3));  // router differs
  CHECK(g8t8.moe_router_topk * g8t8.moe_ffn_hidden_size * 2 ==
        mixtral.moe_router_topk * mixtral.moe_ffn_hidden_size);
  CHECK(model_preset("llama3-8x70b").num_layers == 80);
  for (auto const& n : model_preset_names()) CHECK(model_preset(n).name == n);
  CHECK_NOTHROW(mixtral.validate());
}

TEST_CASE("the cluster presets are the paper's Eos (h100) and its H200 variant") {
  ClusterSpec const h100 = cluster_preset("h100");
  CHECK(h100.gpus_per_node == 8);
  CHECK(h100.peak_tflops == 989.5);
  CHECK(h100.hbm_gb == 80);
  CHECK(h100.nvlink_gb_per_s == 450);
  CHECK(h100.network_gb_per_s == 50);  // 400 Gb/s per GPU
  ClusterSpec const h200 = cluster_preset("h200");
  CHECK(h200.hbm_gb == 141);
  CHECK(h200.hbm_tb_per_s == 4.8);
  CHECK(h200.peak_tflops == h100.peak_tflops);
  CHECK(h200.network_gb_per_s == h100.network_gb_per_s);
}

TEST_CASE("unknown presets and broken shapes are rejected with the rule and numbers") {
  CHECK(error_of([] { model_preset("gpt-5"); }).find("unknown model preset 'gpt-5'") !=
        std::string::npos);
  CHECK(error_of([] { cluster_preset("a100"); }).find("unknown cluster preset 'a100'") !=
        std::string::npos);
  ModelSpec m = mixtral_8x22b();
  m.num_query_groups = 7;
  CHECK(error_of([&] { m.validate(); }) ==
        "model 'mixtral-8x22b': num_attention_heads (48) is not divisible by num_query_groups (7)");
  m = mixtral_8x22b();
  m.moe_router_topk = 9;
  CHECK(error_of([&] { m.validate(); }) ==
        "model 'mixtral-8x22b': moe_router_topk (9) exceeds num_experts (8)");
  ClusterSpec c = h100_cluster();
  c.hbm_gb = 0;
  CHECK(error_of([&] { c.validate(); }) == "cluster 'h100': hbm_gb must be positive (got 0)");
}
