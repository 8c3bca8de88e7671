// MoELayer across foldings: output and every reduced parameter gradient equal the single-rank
// layer's (DESIGN §3 tolerance), dropless and drop-and-pad (the reference applies capacity per
// attention shard, as Megatron does), with and without a shared expert and deduplication; the
// global gradient norm equals the single-rank norm; bad configurations are rejected.

#include <cmath>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/train/gradient_reduction.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;
using Comm = inproc::Communicator;

namespace {

constexpr std::int64_t kH = 8, kTokens = 5;  // tokens per rank: few, so experts go empty

enum class Mode { dropless, dropless_megatron, drop_pad_probs, all_gather, sinkhorn, jitter };

template <Mode M>
struct LayerFor;
template <>
struct LayerFor<Mode::dropless> {
  using type = DefaultMoELayer<test::Exec, float, Comm>;
};
template <>
struct LayerFor<Mode::dropless_megatron> {
  using type = DefaultMoELayer<test::Exec, float, Comm>;
};
template <>
struct LayerFor<Mode::sinkhorn> {
  using type = DefaultMoELayer<test::Exec, float, Comm>;
};
template <>
struct LayerFor<Mode::jitter> {
  using type = DefaultMoELayer<test::Exec, float, Comm>;
};
template <>
struct LayerFor<Mode::drop_pad_probs> {
  using type = MoELayer<test::Exec, TopKRouter<test::Exec, SoftmaxScore, float>, AllToAllDispatcher<DropByProbs>,
                        GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, float>, Comm>;
};
template <>
struct LayerFor<Mode::all_gather> {
  using type = MoELayer<test::Exec, TopKRouter<test::Exec, SoftmaxScore, float>, AllGatherDispatcher<Dropless>,
                        GroupedGemmExperts<test::Exec, SwiGLU, BlasGroupedGemm, float>, Comm>;
};

MoELayerConfig layer_config(Mode mode, std::int64_t shared) {
  MoELayerConfig c{.name = "layers.0.mlp", .hidden_size = kH, .moe_ffn_hidden_size = 8,
                   .moe_shared_expert_intermediate_size = shared,
                   .moe_shared_expert_gate = shared > 0, .seed = 77, .init_std = 0.3};
  c.router.num_experts = 16;
  c.router.moe_router_topk = 2;
  c.router.moe_aux_loss_coeff = {0.0};
  c.moe_token_dispatcher_dedup = mode != Mode::dropless_megatron;
  if (mode == Mode::drop_pad_probs) {
    c.router.moe_expert_capacity_factor = 1.0;
    c.router.moe_pad_expert_input_to_capacity = true;
  }
  if (mode == Mode::sinkhorn)
    c.router.moe_router_load_balancing_type = {LoadBalancingType::sinkhorn};
  if (mode == Mode::jitter) c.router.moe_input_jitter_eps = 0.1;
  return c;
}

double global_in(std::int64_t i) { return std::sin(0.37 * static_cast<double>(i) + 0.1); }
double global_dy(std::int64_t i) { return std::cos(0.23 * static_cast<double>(i)); }
/// The global indices of `count` tokens from `first` on (the input jitter's key): rank r holds
/// global tokens r·kTokens … r·kTokens + kTokens − 1.
std::vector<std::int64_t> token_index(std::int64_t first, std::int64_t count) {
  std::vector<std::int64_t> index(static_cast<std::size_t>(count));
  for (std::int64_t t = 0; t < count; ++t) index[static_cast<std::size_t>(t)] = first + t;
  return index;
}

using GradMap = std::map<std::string, std::vector<double>>;  // name → global gradient

struct Reference {
  std::vector<float> y;   // [W·T, H], rank-major
  std::vector<float> dx;  // [W·T, H], rank-major
  GradMap grads;         // summed over shards
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> shapes;
};

/// The single-rank layer run shard by shard (capacity per attention shard), or once on all
/// world·kTokens tokens when `whole`; gradients summed.
template <Mode M>
Reference reference(int world, std::int64_t shared, bool whole = false) {
  Reference ref;
  auto const fold = FoldedMapping::from({.world = 1});
  inproc::run(1, [&](Comm& w) {
    ProcessGroups groups(fold, w);
    typename LayerFor<M>::type layer(layer_config(M, shared), groups);
    std::int64_t const n = whole ? world * kTokens : kTokens;  // tokens per forward
    for (int r = 0; r < (whole ? 1 : world); ++r) {
      std::vector<float> x(n * kH), dy(n * kH);
      for (std::int64_t i = 0; i < n * kH; ++i) {
        x[static_cast<std::size_t>(i)] = static_cast<float>(global_in(r * n * kH + i));
        dy[static_cast<std::size_t>(i)] = static_cast<float>(global_dy(r * n * kH + i));
      }
      auto const index = token_index(r * n, n);
      auto const y = layer.forward(x, {.token_index = index});
      ref.y.insert(ref.y.end(), y.begin(), y.end());
      auto const dx = layer.backward(dy);
      ref.dx.insert(ref.dx.end(), dx.begin(), dx.end());
    }
    for (auto* p : layer.parameters()) {
      ref.grads[p->name].assign(p->grad.begin(), p->grad.end());
      ref.shapes[p->name] = {p->global_rows, p->global_cols};
    }
  });
  return ref;
}

double rel(std::vector<double> const& a, std::vector<double> const& b) {
  return test::relative_error(a, b);
}

template <Mode M>
void check_folding(FoldingConfig const& config, std::int64_t shared, bool whole_reference = false) {
  auto const fold = FoldedMapping::from(config);
  int const w = fold.world_size();
  auto const ref = reference<M>(w, shared, whole_reference);
  double const dpcp = static_cast<double>(fold.dp() * fold.cp());
  // Reference norm of the reduced gradients (each global element once).
  double ref_sq = 0;
  for (auto const& [name, g] : ref.grads)
    for (double v : g) ref_sq += (v / dpcp) * (v / dpcp);

  std::vector<std::string> failures(static_cast<std::size_t>(w));
  inproc::run(w, [&](Comm& world) {
    auto& fail = failures[static_cast<std::size_t>(world.rank())];
    ProcessGroups groups(fold, world);
    typename LayerFor<M>::type layer(layer_config(M, shared), groups);
    int const r = world.rank();
    std::vector<float> x(kTokens * kH), dy(kTokens * kH);
    for (std::int64_t i = 0; i < kTokens * kH; ++i) {
      x[static_cast<std::size_t>(i)] = static_cast<float>(global_in(r * kTokens * kH + i));
      dy[static_cast<std::size_t>(i)] = static_cast<float>(global_dy(r * kTokens * kH + i));
    }
    auto const index = token_index(r * kTokens, kTokens);
    auto const y = layer.forward(x, {.token_index = index});
    std::vector<double> got(y.begin(), y.end());
    std::vector<double> want(ref.y.begin() + r * kTokens * kH, ref.y.begin() + (r + 1) * kTokens * kH);
    if (rel(got, want) > 1e-5) fail += fmt::format("output differs (rel {:.2e}); ", rel(got, want));
    auto const dx = layer.backward(dy);
    std::vector<double> got_dx(dx.begin(), dx.end());
    std::vector<double> want_dx(ref.dx.begin() + r * kTokens * kH, ref.dx.begin() + (r + 1) * kTokens * kH);
    if (rel(got_dx, want_dx) > 1e-5) fail += fmt::format("input gradient differs (rel {:.2e}); ", rel(got_dx, want_dx));
    auto params = layer.parameters();
    reduce_gradients(test::Exec{}, params, groups);
    for (auto* p : params) {
      std::vector<double> global = ref.grads.at(p->name);
      for (auto& v : global) v /= dpcp;
      auto const local = p->template local_of<double>(std::span<double const>(global));
      std::vector<double> mine(p->grad.begin(), p->grad.end());
      if (rel(mine, local) > 1e-5)
        fail += fmt::format("{} gradient differs (rel {:.2e}); ", p->name, rel(mine, local));
    }
    double const norm = global_grad_norm(test::Exec{}, params, groups);
    if (std::abs(norm - std::sqrt(ref_sq)) > 1e-5 * std::sqrt(ref_sq))
      fail += fmt::format("grad norm {} vs {}; ", norm, std::sqrt(ref_sq));
  });
  for (int r = 0; r < w; ++r) {
    INFO("world " << w << " tp " << config.tp << " cp " << config.cp << " ep " << config.ep
                  << " etp " << fold.etp() << " dp " << fold.dp() << " edp " << fold.edp()
                  << " shared " << shared << " whole reference " << whole_reference << " rank "
                  << r);
    CHECK(failures[static_cast<std::size_t>(r)].empty());
    if (!failures[static_cast<std::size_t>(r)].empty()) FAIL_CHECK(failures[static_cast<std::size_t>(r)]);
  }
}

std::vector<FoldingConfig> foldings() {
  return {
      {.world = 1},
      {.world = 2, .ep = 2, .etp = 1},
      {.world = 2, .tp = 2, .ep = 1, .etp = 1},               // EP = 1, EDP = 2
      {.world = 2, .tp = 2, .ep = 2, .etp = 1},               // EP spans TP
      {.world = 2, .tp = 2, .ep = 1, .etp = 2},               // ETP = TP
      {.world = 4, .tp = 2, .cp = 2, .ep = 4, .etp = 1},      // EP spans TP and CP
      {.world = 4, .cp = 2, .ep = 2, .etp = 2},               // ETP > TP
      {.world = 4, .tp = 4, .ep = 2, .etp = 2},
      {.world = 4, .ep = 2, .etp = 1},                        // DP 4, EDP 2
      {.world = 4, .tp = 2, .ep = 1, .etp = 2},               // EP 1, ETP 2, EDP 2
      {.world = 4, .tp = 2, .cp = 2, .ep = 1, .etp = 1},      // EP 1, EDP 4
      {.world = 8, .tp = 2, .cp = 2, .ep = 8, .etp = 1},      // DP 2 folded too
      {.world = 8, .tp = 2, .cp = 2, .ep = 4, .etp = 2},
      {.world = 8, .cp = 2, .ep = 4, .etp = 1},               // EDP 2
      {.world = 8, .tp = 4, .ep = 8, .etp = 1},
      {.world = 8, .ep = 2, .etp = 4},                        // ETP 4 > TP 1
      {.world = 8, .tp = 2, .cp = 2, .ep = 2, .etp = 2},      // EDP 2
      {.world = 8, .tp = 2, .ep = 4, .etp = 1},               // DP 4, EDP 2
      {.world = 16, .tp = 2, .cp = 2, .ep = 8, .etp = 1},     // DP 4, EDP 2
      {.world = 16, .tp = 2, .cp = 2, .ep = 16, .etp = 1},
      {.world = 16, .tp = 4, .cp = 2, .ep = 4, .etp = 4},
      {.world = 16, .cp = 4, .ep = 4, .etp = 2},              // EDP 2
  };
}

}  // namespace

TEST_CASE("the MoE layer equals the single-rank layer across foldings: dropless, deduplicated") {
  for (auto const& f : foldings()) check_folding<Mode::dropless>(f, 0);
}

TEST_CASE("the MoE layer equals the single-rank layer: dropless in Megatron's mode, with a shared expert") {
  for (auto const& f : foldings()) check_folding<Mode::dropless_megatron>(f, 8);
}

TEST_CASE("the MoE layer equals the single-rank layer per attention shard: drop-and-pad by probs") {
  for (auto const& f : foldings()) check_folding<Mode::drop_pad_probs>(f, 0);
}

TEST_CASE("the MoE layer equals the single-rank layer: all-gather dispatcher") {
  for (auto const& f : foldings()) check_folding<Mode::all_gather>(f, 0);
}

TEST_CASE("MoE configurations that cannot fit the folding are rejected with the numbers") {
  using Catch::Matchers::Contains;
  std::vector<std::string> messages(2);
  auto const fold = FoldedMapping::from({.world = 2, .ep = 1, .etp = 2});
  inproc::run(2, [&](Comm& world) {
    ProcessGroups groups(fold, world);
    auto expect = [&](int k, auto&& make) {
      try {
        make();
      } catch (invalid_config const& e) {
        if (world.rank() == 0) messages[static_cast<std::size_t>(k)] = e.what();
      }
    };
    expect(0, [&] {
      auto c = layer_config(Mode::dropless, 0);
      c.moe_ffn_hidden_size = 7;
      DefaultMoELayer<test::Exec, float, Comm> layer(c, groups);
    });
    expect(1, [&] {
      auto c = layer_config(Mode::dropless, 0);
      c.router.moe_expert_capacity_factor = 1.5;
      DefaultMoELayer<test::Exec, float, Comm> layer(c, groups);
    });
  });
  CHECK_THAT(messages[0], Contains("moe_ffn_hidden_size (7) is not divisible by expert_tensor_parallel_size (2)"));
  CHECK_THAT(messages[1], Contains("moe_expert_capacity_factor = 1.5 asks for token dropping, but the dispatcher policy is Dropless"));
  auto const fold3 = FoldedMapping::from({.world = 3, .ep = 3, .etp = 1});
  std::string m3;
  inproc::run(3, [&](Comm& world) {
    ProcessGroups groups(fold3, world);
    try {
      DefaultMoELayer<test::Exec, float, Comm> layer(layer_config(Mode::dropless, 0), groups);
    } catch (invalid_config const& e) {
      if (world.rank() == 0) m3 = e.what();
    }
  });
  CHECK_THAT(m3, Contains("num_experts (16) is not divisible by expert_model_parallel_size (3)"));
}

TEST_CASE("the MoE layer's gradients agree with central finite differences (fp64, one rank)") {
  using Layer = DefaultMoELayer<test::Exec, double, Comm>;
  auto const fold = FoldedMapping::from({.world = 1});
  std::vector<double> analytic, numeric;
  inproc::run(1, [&](Comm& w) {
    ProcessGroups groups(fold, w);
    auto cfg = layer_config(Mode::dropless, 8);
    cfg.moe_shared_expert_gate = true;  // the shared expert's sigmoid gate too
    cfg.router.moe_aux_loss_coeff = {0.01};  // the load-balancing loss enters the gradient too
    cfg.router.moe_z_loss_coeff = 0.001;
    Layer layer(cfg, groups);
    std::vector<double> x(kTokens * kH), r(kTokens * kH);
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = global_in(static_cast<std::int64_t>(i));
      r[i] = global_dy(static_cast<std::int64_t>(i));
    }
    auto loss = [&] {
      auto const y = layer.forward(x);
      double s = layer.aux_loss();
      for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * r[i];
      return s;
    };
    (void)loss();
    auto const dx = layer.backward(r);
    auto fd = [&](double& v) { return test::central_difference(v, loss); };
    for (std::size_t i = 0; i < x.size(); i += 3) {
      analytic.push_back(dx[i]);
      numeric.push_back(fd(x[i]));
    }
    for (auto* p : layer.parameters())
      for (std::size_t i = 0; i < p->size(); i += 7) {
        analytic.push_back(p->grad[i]);
        numeric.push_back(fd(p->value[i]));
      }
  });
  REQUIRE(analytic.size() > 100);
  CHECK(rel(analytic, numeric) < 1e-6);
}

namespace {

/// The foldings of the sinkhorn and jitter tests: EP across TP and CP, ETP > 1, DP with EDP.
std::vector<FoldingConfig> router_option_foldings() {
  return {
      {.world = 1},
      {.world = 2, .tp = 2, .ep = 2, .etp = 1},
      {.world = 4, .tp = 2, .cp = 2, .ep = 4, .etp = 1},
      {.world = 8, .tp = 2, .cp = 2, .ep = 4, .etp = 2},
      {.world = 4, .ep = 2, .etp = 1},
  };
}

/// ‖y_a − y_b‖ / ‖y_b‖ of two references' outputs.
double output_difference(Reference const& a, Reference const& b) {
  return rel(std::vector<double>(a.y.begin(), a.y.end()),
             std::vector<double>(b.y.begin(), b.y.end()));
}

}  // namespace

TEST_CASE("the MoE layer with sinkhorn routing equals the single-rank layer per attention shard") {
  // Megatron balances each rank's local [T, E] logits: the reference runs shard by shard.
  REQUIRE(output_difference(reference<Mode::sinkhorn>(4, 0), reference<Mode::dropless>(4, 0)) >
          1e-3);  // sinkhorn routes these tokens otherwise than plain top-k
  for (auto const& f : router_option_foldings()) check_folding<Mode::sinkhorn>(f, 0);
}

TEST_CASE("input jitter: the MoE layer equals the single-rank layer given global token indices") {
  // The noise is keyed by the global token index, so it does not depend on the folding: with
  // dropless routing the reference may run shard by shard or once on all tokens.
  REQUIRE(output_difference(reference<Mode::jitter>(4, 0), reference<Mode::dropless>(4, 0)) >
          1e-3);  // the jitter changes the routing's probabilities
  for (auto const& f : router_option_foldings()) {
    check_folding<Mode::jitter>(f, 0);
    check_folding<Mode::jitter>(f, 0, /*whole_reference=*/true);
  }
}
