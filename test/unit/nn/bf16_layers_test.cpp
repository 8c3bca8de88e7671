// BF16 layers (Megatron's --bf16: bf16 parameters and activations, FP32 accumulation in every
// GEMM and reduction, FP32 main gradients). A finite-difference check means nothing at bf16's
// 8 bits, so each bf16 layer is checked against the same float layer run on the same
// bf16-representable inputs and weights: output, input gradient and weight gradients within a
// relative L2 of 1e-2 (bf16 rounds each stored tensor to 2⁻⁹ relative), and the folded bf16
// layer against the single-rank bf16 layer.

#include <type_traits>

#include "moefold/moe/grouped_gemm_experts.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/nn/decoder_layer.hpp"
#include "moefold/nn/rms_norm.hpp"
#include "support/error_of.hpp"
#include "unit/nn/nn_support.hpp"

using namespace moefold;
using namespace moefold::test;

namespace {

constexpr std::uint64_t kSeed = 1234;
constexpr double kBf16Tol = 1e-2;

template <class T>
RmsNorm<Exec, T> make_norm() {
  return RmsNorm<Exec, T>(
      {.name = "norm.weight", .hidden = 32, .seed = kSeed, .dist = InitDist::uniform, .scale = 1.0});
}

/// Two local SwiGLU experts over 128 rows of width 32 (90 and 38 rows), each row scaled by a
/// routing probability: fc1, activation, probabilities, fc2 and their backward.
template <class T>
struct ExpertsBlock {
  GroupedGemmExperts<Exec, SwiGLU, BlasGroupedGemm, T> experts{
      ExpertsConfig{.num_local_experts = 2, .hidden_size = 32, .ffn_hidden_size = 48,
                    .init_std = 0.3},
      kSeed};
  std::vector<std::int64_t> counts{90, 38};
  std::vector<T> probs = random_tensor<T>(128, "probs");
  std::vector<T> forward(std::span<T const> x) {
    return experts.forward(x, std::span<T const>(probs), counts);
  }
  std::vector<T> backward(std::span<T const> dy) { return experts.backward(dy).input; }
  ParamList<T> parameters() { return experts.parameters(); }
};

auto const local_forward = [](auto& block, auto x, std::int64_t) { return block.forward(x); };
auto const sequence_forward = [](auto& block, auto x, std::int64_t batch) {
  return block.forward(x, batch);
};

template <class T>
std::vector<double> as_double(T const& v) {
  std::vector<double> out;
  for (auto const& x : v) out.push_back(static_cast<double>(static_cast<float>(x)));
  return out;
}

/// Runs the float block and the bf16 block (`make(groups, tag)`) on one rank over the same
/// bf16-representable input and output gradient, the float block's weights set to the bf16
/// block's (rounded) values, and compares output, input gradient and weight gradients.
template <class Make, class Forward>
void check_against_float(BlockShape shape, Make make, Forward forward, double tol = kBf16Tol) {
  auto const xb = random_tensor<bf16>(static_cast<std::size_t>(shape.seq * shape.global_batch * shape.width_in), "x");
  auto const gb = random_tensor<bf16>(static_cast<std::size_t>(shape.seq * shape.global_batch * shape.width_out), "dy");
  std::vector<float> xf, gf;
  for (auto v : xb) xf.push_back(static_cast<float>(v));
  for (auto v : gb) gf.push_back(static_cast<float>(v));
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({}), world);
    auto fb = make(groups, float{});
    auto bb = make(groups, bf16{});
    auto const pf = fb.parameters();
    auto const pb = bb.parameters();
    checks.equal(pf.size(), pb.size(), "parameter count");
    for (std::size_t k = 0; k < pf.size(); ++k)
      for (std::size_t i = 0; i < pf[k]->size(); ++i)
        pf[k]->value[static_cast<std::int64_t>(i)] =
            static_cast<float>(pb[k]->value[static_cast<std::int64_t>(i)]);
    std::vector<float> const yf = forward(fb, std::span<float const>(xf), shape.global_batch);
    std::vector<bf16> const yb = forward(bb, std::span<bf16 const>(xb), shape.global_batch);
    auto const ey = rel_error(as_double(yb), as_double(yf));
    checks.check(ey <= tol, fmt::format("output: relative error {:.3e}", ey));
    // The bf16 output really is bf16 (rounded): not bitwise the float one.
    checks.check(ey > 0, "output: the bf16 layer gives the float layer's exact values");
    auto const dxf = fb.backward(std::span<float const>(gf));
    auto const dxb = bb.backward(std::span<bf16 const>(gb));
    auto const ex = rel_error(as_double(dxb), as_double(dxf));
    checks.check(ex <= tol, fmt::format("input gradient: relative error {:.3e}", ex));
    for (std::size_t k = 0; k < pf.size(); ++k) {
      static_assert(std::is_same_v<typename std::remove_reference_t<decltype(pb[k]->grad)>::value_type, float>,
                    "a bf16 parameter's gradient is FP32 (main_grad)");
      auto const eg = rel_error(as_double(pb[k]->grad), as_double(pf[k]->grad));
      checks.check(eg <= tol, fmt::format("gradient of {}: relative error {:.3e}",
                                               pb[k]->name, eg));
    }
  });
}

}  // namespace

TEST_CASE("bf16 column- and row-parallel linear layers equal the float layers within bf16",
          "[nn][linear][bf16]") {
  check_against_float(
      {}, [](Groups& g, auto tag) { return LinearPair<decltype(tag)>(g, kSeed); }, local_forward);
  check_equivalence<bf16>(
      {}, {{.tp = 2, .cp = 2, .dp = 2}, {.tp = 4}},
      [](Groups& g) { return LinearPair<bf16>(g, kSeed); }, local_forward, kBf16Tol);
}

TEST_CASE("bf16 RMSNorm equals the float norm within bf16", "[nn][rms_norm][bf16]") {
  check_against_float({}, [](Groups&, auto tag) { return make_norm<decltype(tag)>(); },
                      local_forward);
  check_equivalence<bf16>(
      {}, {{.tp = 2, .cp = 2, .dp = 2}}, [](Groups&) { return make_norm<bf16>(); }, local_forward,
      kBf16Tol);
}

TEST_CASE("bf16 grouped-GEMM SwiGLU experts equal the float experts within bf16",
          "[moe][experts][bf16]") {
  check_against_float({}, [](Groups&, auto tag) { return ExpertsBlock<decltype(tag)>(); },
                      local_forward);
}

TEST_CASE("bf16 causal GQA attention with RoPE equals the float attention within bf16",
          "[nn][attention][bf16]") {
  check_against_float(
      {},
      [](Groups& g, auto tag) {
        return Attention<Exec, decltype(tag), Comm>(attention_config(), g.tp(), g.cp());
      },
      sequence_forward);
  check_equivalence<bf16>(
      {}, {{.tp = 2, .cp = 2, .dp = 2}},
      [](Groups& g) { return Attention<Exec, bf16, Comm>(attention_config(), g.tp(), g.cp()); },
      sequence_forward, kBf16Tol);
}

TEST_CASE("a bf16 decoder layer (attention + dense MLP) equals the float layer within bf16",
          "[nn][decoder_layer][bf16]") {
  auto make = [](Groups& g, auto tag) {
    return DecoderLayer<Exec, decltype(tag), Comm>(
        {.name = "layers.0", .attention = attention_config(), .mlp = mlp_config()}, g);
  };
  // A dozen roundings in a chain (norm, QKV, RoPE, probabilities, context, projection,
  // residual, norm, fc1, SwiGLU, fc2, residual): 1.0e-2 on the output, 1.4e-2 on the input
  // gradient; the folded bf16 layer differs from the single-rank bf16 layer by up to 1.1e-2
  // (its reduce-scatters round partial sums in another order).
  check_against_float({}, make, sequence_forward, 2e-2);
  check_equivalence<bf16>(
      {}, {{.tp = 2, .cp = 2, .dp = 2}}, [&](Groups& g) { return make(g, bf16{}); },
      sequence_forward, 2e-2);
}

TEST_CASE("a bf16 MoE layer (FP32 router, bf16 experts and shared expert) equals the float layer "
          "within bf16",
          "[moe][moe_layer][bf16]") {
  // The router weight is a bf16 parameter whose FP32 main gradient receives the FP32 router's.
  // (moe_router_dtype = fp32: with the input dtype, bf16 logits could flip a near tie of the
  // top-k against the float layer; the test below checks that rounding.)
  MoELayerConfig moe{.name = "layers.0.mlp", .hidden_size = 32, .moe_ffn_hidden_size = 16,
                     .moe_shared_expert_intermediate_size = 32, .seed = kSeed, .init_std = 0.3};
  moe.router.num_experts = 8;
  moe.router.moe_router_topk = 2;
  moe.router.moe_router_dtype = RouterDtype::fp32;
  auto make = [&](Groups& g, auto tag) {
    return DefaultMoELayer<Exec, decltype(tag), Comm>(moe, g);
  };
  check_against_float({}, make, local_forward);
  check_equivalence<bf16>(
      {}, {{.tp = 2, .cp = 2, .dp = 2, .ep = 4, .etp = 1}},
      [&](Groups& g) { return make(g, bf16{}); }, local_forward, kBf16Tol);
}

TEST_CASE("an FP64 router (moe_router_dtype fp64) in float and bf16 MoE layers equals the float "
          "layer within bf16",
          "[moe][moe_layer][bf16][router_dtype]") {
  // The FP64 router's weight gradient joins the layer's main gradient (float) rounded once.
  MoELayerConfig moe{.name = "layers.0.mlp", .hidden_size = 32, .moe_ffn_hidden_size = 16,
                     .seed = kSeed, .init_std = 0.3};
  moe.router.num_experts = 8;
  moe.router.moe_router_topk = 2;
  moe.router.moe_router_dtype = RouterDtype::fp64;
  auto make = [&](Groups& g, auto tag) {
    using T = decltype(tag);
    return MoELayer<Exec, TopKRouter<Exec, SoftmaxScore, double>, AllToAllDispatcher<Dropless>,
                    GroupedGemmExperts<Exec, SwiGLU, BlasGroupedGemm, T>, Comm>(moe, g);
  };
  check_against_float({}, make, local_forward);
  // Against the float layer with its own FP32 router (an independent path for the gradient).
  auto fp32_moe = moe;
  fp32_moe.router.moe_router_dtype = std::nullopt;
  auto make_mixed = [&](Groups& g, auto tag) {
    if constexpr (std::is_same_v<decltype(tag), float>)
      return DefaultMoELayer<Exec, float, Comm>(fp32_moe, g);
    else
      return make(g, tag);
  };
  check_against_float({}, make_mixed, local_forward);
}

TEST_CASE("moe_router_dtype unset: a bf16 layer's router stores bf16 logits (a near tie flips "
          "the top-k as in a bf16 GEMM), fp32 keeps FP32 logits",
          "[moe][router][bf16][router_dtype]") {
  // W = I and x = the logits: 1 + 2^-8 lies halfway between bf16's 1 and 1 + 2^-7 and rounds
  // to 1 (ties to even), tying expert 0, which the lower id then wins.
  RouterConfig cfg;
  cfg.num_experts = 4;
  cfg.moe_router_topk = 2;
  std::vector<float> const x{1.0f, 1.00390625f, 0.5f, 3.0f};
  auto route = [&](bool bf16_logits) {
    TopKRouter<Exec, SoftmaxScore, float> router(cfg, 4);
    for (std::int64_t i = 0; i < 4; ++i) router.weight()[i * 4 + i] = 1.0f;
    router.round_logits_to_bf16(bf16_logits);
    return router.forward(std::span<float const>(x), 1).routing;
  };
  auto const fp32 = route(false), rounded = route(true);
  auto routed = [](Routing<float> const& r, std::size_t e) { return r.map[e] == Route::routed; };
  CHECK(routed(fp32, 1));
  CHECK_FALSE(routed(fp32, 0));
  CHECK(routed(rounded, 0));
  CHECK_FALSE(routed(rounded, 1));
  // Softmax over the top-2 logits {1, 3} (both exact in bf16): 1 / (1 + e^2) and e^2 / (1 + e^2).
  double const e2 = std::exp(2.0);
  CHECK(rounded.probs[0] == Approx(1.0 / (1.0 + e2)).epsilon(1e-6));
  CHECK(rounded.probs[3] == Approx(e2 / (1.0 + e2)).epsilon(1e-6));
  CHECK(fp32.probs[1] == Approx(std::exp(1.00390625) / (std::exp(1.00390625) + std::exp(3.0)))
                             .epsilon(1e-6));

  // The layer turns the rounding on for bf16 with the dtype unset only.
  MoELayerConfig moe{.name = "layers.0.mlp", .hidden_size = 8, .moe_ffn_hidden_size = 8,
                     .seed = kSeed};
  moe.router.num_experts = 4;
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({}), world);
    DefaultMoELayer<Exec, bf16, Comm> input_dtype(moe, groups);
    DefaultMoELayer<Exec, float, Comm> float_layer(moe, groups);
    auto fp32_moe = moe;
    fp32_moe.router.moe_router_dtype = RouterDtype::fp32;
    DefaultMoELayer<Exec, bf16, Comm> fp32_layer(fp32_moe, groups);
    checks.check(input_dtype.router().rounds_logits_to_bf16(), "bf16 layer, dtype unset: rounds");
    checks.check(!float_layer.router().rounds_logits_to_bf16(), "float layer: no rounding");
    checks.check(!fp32_layer.router().rounds_logits_to_bf16(), "bf16 layer, fp32: no rounding");
  });
}

TEST_CASE("moe_router_dtype against the router's type gives a clear error",
          "[moe][router][router_dtype][errors]") {
  RouterConfig cfg;
  cfg.num_experts = 4;
  cfg.moe_router_dtype = RouterDtype::fp64;
  CHECK_THAT(error_of([&] { TopKRouter<Exec, SoftmaxScore, float>(cfg, 8); }),
             Catch::Matchers::Contains("moe_router_dtype = fp64 needs a router computing in double "
                                       "(TopKRouter<Exec, Score, double>); this router computes "
                                       "in float"));
  MoELayerConfig moe{.name = "layers.0.mlp", .hidden_size = 8, .moe_ffn_hidden_size = 8};
  moe.router.num_experts = 4;
  expect_clean<InprocHarness>(1, [&](Comm& world, RankChecks& checks) {
    Groups groups(mapping_of({}), world);
    using WideLayer = MoELayer<Exec, TopKRouter<Exec, SoftmaxScore, double>,
                               AllToAllDispatcher<Dropless>,
                               GroupedGemmExperts<Exec, SwiGLU, BlasGroupedGemm, bf16>, Comm>;
    auto const msg = error_of([&] { WideLayer(moe, groups); });
    checks.check(msg.find("moe_router_dtype is unset (the input dtype, bf16) but the router "
                          "computes in double") != std::string::npos,
                 msg);
  });
}
