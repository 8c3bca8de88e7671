// Every block of nn/ gives, under every folding TP ∈ {1,2,4} × CP ∈ {1,2,4} × DP ∈ {1,2} (up to
// 16 ranks), the output, input gradient and (reduced) parameter gradients of the same block run
// on one rank over the whole global batch (DESIGN §3, fp32, ‖a−b‖ ≤ 1e-5·‖b‖).

#include <set>

#include "moefold/moe/moe_layer.hpp"
#include "moefold/nn/decoder_layer.hpp"
#include "unit/nn/nn_support.hpp"

using namespace moefold;
using namespace moefold::test;

namespace {

constexpr std::uint64_t kSeed = 1234;

auto const local_forward = [](auto& block, std::span<float const> x, std::int64_t) {
  return block.forward(x);
};
auto const sequence_forward = [](auto& block, std::span<float const> x, std::int64_t batch) {
  return block.forward(x, batch);
};

}  // namespace

TEST_CASE("sequence shards cover every token of the global batch exactly once",
          "[nn][sequence_shard]") {
  for (auto const f : all_foldings()) {
    INFO("folding " << f.str());
    std::int64_t const seq = 32, batch = 4;
    std::vector<std::int64_t> global(static_cast<std::size_t>(seq * batch));
    for (std::size_t i = 0; i < global.size(); ++i) global[i] = static_cast<std::int64_t>(i);
    std::vector<std::int64_t> rebuilt(global.size(), -1);
    std::multiset<std::int64_t> seen;
    for (int d = 0; d < f.dp; ++d)
      for (int c = 0; c < f.cp; ++c)
        for (int t = 0; t < f.tp; ++t) {
          SequenceShard const s{.seq = seq,
                                .batch = batch / f.dp,
                                .tp = f.tp,
                                .tp_rank = t,
                                .cp = f.cp,
                                .cp_rank = c,
                                .dp = f.dp,
                                .dp_rank = d};
          auto const local = s.extract(std::span<std::int64_t const>(global), 1);
          s.insert(std::span<std::int64_t const>(local), std::span<std::int64_t>(rebuilt), 1);
          seen.insert(local.begin(), local.end());
          // Row j of the local shard is at the position the shard names.
          auto const pos = s.positions();
          for (std::size_t j = 0; j < pos.size(); ++j)
            CHECK(local[j * static_cast<std::size_t>(s.batch)] == pos[j] * batch + d * s.batch);
        }
    CHECK(rebuilt == global);
    CHECK(seen.size() == global.size());
    CHECK(std::set<std::int64_t>(seen.begin(), seen.end()).size() == global.size());
  }
}

TEST_CASE("CP rank c holds chunks c and 2·CP−1−c, split contiguously over TP",
          "[nn][sequence_shard]") {
  // S = 16, CP = 2, TP = 2: chunks of 4 (the drawing of sequence_shard.hpp).
  auto positions = [](int c, int t) {
    return SequenceShard{.seq = 16, .batch = 1, .tp = 2, .tp_rank = t, .cp = 2, .cp_rank = c}
        .positions();
  };
  using P = std::vector<std::int64_t>;
  CHECK(positions(0, 0) == P{0, 1, 2, 3});
  CHECK(positions(0, 1) == P{12, 13, 14, 15});
  CHECK(positions(1, 0) == P{4, 5, 6, 7});
  CHECK(positions(1, 1) == P{8, 9, 10, 11});
}

TEST_CASE("column- and row-parallel linear layers with SP equal the single-rank layers",
          "[nn][linear]") {
  check_equivalence<float>(
      {}, all_foldings(), [](Groups& g) { return LinearPair<float>(g, kSeed); }, local_forward);
}

TEST_CASE("RMSNorm equals the single-rank norm, its weight gradient summed over tp",
          "[nn][rms_norm]") {
  check_equivalence<float>(
      {}, all_foldings(),
      [](Groups&) {
        return RmsNorm<Exec, float>({.name = "norm.weight",
                               .hidden = 32,
                               .seed = kSeed,
                               .dist = InitDist::uniform,
                               .scale = 1.0});
      },
      local_forward);
}

TEST_CASE("causal GQA attention with RoPE, TP+SP and CP equals the single-rank attention",
          "[nn][attention]") {
  check_equivalence<float>(
      {}, all_foldings(),
      [](Groups& g) { return Attention<Exec, float, Comm>(attention_config(), g.tp(), g.cp()); },
      sequence_forward);
}

TEST_CASE(
    "attention with a QKV bias (--add-qkv-bias) and rotary base 1e6 under TP+SP and CP equals "
    "the single-rank attention, bias gradient included",
    "[nn][attention][qkv_bias]") {
  check_equivalence<float>(
      {}, all_foldings(),
      [](Groups& g) {
        auto cfg = attention_config();
        cfg.add_qkv_bias = true;
        cfg.rope_base = 1e6;
        Attention<Exec, float, Comm> attn(cfg, g.tp(), g.cp());
        // Megatron starts the bias at zero; a random one shows it in the output.
        auto& b = attn.linear_qkv_bias();
        auto const global = random_tensor<float>(static_cast<std::size_t>(b.global_cols), "bias");
        auto const local = b.local_of(std::span<float const>(global));
        std::copy(local.begin(), local.end(), b.value.begin());
        return attn;
      },
      sequence_forward);
}

TEST_CASE("the dense SwiGLU MLP with TP+SP equals the single-rank MLP", "[nn][mlp]") {
  check_equivalence<float>(
      {}, all_foldings(), [](Groups& g) { return DenseMlp<Exec, float, Comm>(mlp_config(), g); },
      local_forward);
}

TEST_CASE("a decoder layer (attention + dense MLP) equals the single-rank layer",
          "[nn][decoder_layer]") {
  check_equivalence<float>(
      {}, all_foldings(),
      [](Groups& g) {
        return DecoderLayer<Exec, float, Comm>(
            {.name = "layers.0", .attention = attention_config(), .mlp = mlp_config()}, g);
      },
      sequence_forward);
}

TEST_CASE("a folded decoder layer with the MoE block equals the single-rank layer",
          "[nn][decoder_layer][moe]") {
  // Attention TP·CP·DP and MoE ETP·EP·EDP over the same ranks, e.g. TP2·CP2·DP2 with EP8·ETP1.
  std::vector<Folding> const foldings{{.tp = 2, .cp = 2, .dp = 2, .ep = 8, .etp = 1},
                                      {.tp = 2, .cp = 1, .dp = 1, .ep = 2, .etp = 1},
                                      {.tp = 1, .cp = 2, .dp = 2, .ep = 4, .etp = 1},
                                      {.tp = 2, .cp = 2, .dp = 1, .ep = 2, .etp = 2},
                                      {.tp = 4, .cp = 1, .dp = 2, .ep = 4, .etp = 2},
                                      {.tp = 2, .cp = 4, .dp = 2, .ep = 8, .etp = 2}};
  using Moe = DefaultMoELayer<test::Exec, float, Comm>;
  MoELayerConfig moe{.name = "layers.0.mlp", .hidden_size = 32, .moe_ffn_hidden_size = 16,
                     .moe_shared_expert_intermediate_size = 32, .seed = kSeed, .init_std = 0.3};
  moe.router.num_experts = 8;
  moe.router.moe_router_topk = 2;
  check_equivalence<float>(
      {}, foldings,
      [&](Groups& g) {
        return DecoderLayer<Exec, float, Comm, Moe>(
            {.name = "layers.0", .attention = attention_config(), .mlp = moe}, g);
      },
      sequence_forward);
}

TEST_CASE("the CP exchange all-gathers K and V and reduce-scatters their gradients over cp",
          "[nn][attention][context_parallel]") {
  // Per rank: 2 tensors · (CP−1) · (S/CP)·B·(G/TP)·d elements each way (context_parallel.hpp).
  for (Folding const f : {Folding{1, 2, 1}, Folding{2, 2, 1}, Folding{1, 4, 2}}) {
    INFO("folding " << f.str());
    std::int64_t const seq = 32, batch = 4 / f.dp, width = 32;
    auto const x = random_tensor<float>(static_cast<std::size_t>(seq * 4 * width), "x");
    expect_clean<InprocHarness>(f.world(), [&](Comm& world, RankChecks& checks) {
      Groups groups(mapping_of(f), world);
      auto const shard = SequenceShard::of(groups, seq, batch);
      Attention<Exec, float, Comm> attn(attention_config(), groups.tp(), groups.cp());
      auto const xl = shard.extract(std::span<float const>(x), width);
      groups.cp().reset_traffic();
      auto const y = attn.forward(std::span<float const>(xl), batch);
      auto const dx = attn.backward(std::span<float const>(y));
      auto const expected = static_cast<std::uint64_t>(2 * (f.cp - 1) * (seq / f.cp) * batch *
                                                       (4 / f.tp) * 8 * sizeof(float));
      auto const& t = groups.cp().traffic();
      checks.equal(t[CollectiveKind::all_gather].bytes_received, expected, "K/V all-gather bytes");
      checks.equal(t[CollectiveKind::reduce_scatter].bytes_sent, expected,
                   "dK/dV reduce-scatter bytes");
      checks.equal(t.total_received() + t.total_sent(), 4 * expected, "all cp traffic");
    });
  }
  // The causal minimum over all CP ranks is 3/4 of what the all-gather moves.
  for (std::int64_t cp : {2, 3, 4, 8}) {
    auto const c = cp_exchange_chunks(cp);
    CHECK(4 * c.minimum == 3 * c.moved);
  }
}
