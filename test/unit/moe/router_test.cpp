// TopKRouter: selection rules (ties, groups, score functions, expert bias), capacity and drop
// policies, load-balancing and z losses against their formulas, finite-difference checks of
// the router and every auxiliary loss in fp64, and clear errors for invalid input.

#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "comm/backends.hpp"
#include "moe_test_support.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/capacity.hpp"
#include "moefold/moe/router.hpp"
#include "support/error_of.hpp"
#include "support/exec.hpp"

using namespace moefold;
using Catch::Matchers::Contains;

namespace {

using moefold::test::error_of;
using Exec = moefold::test::Exec;

std::vector<int> chosen(Routing<double> const& r, std::int64_t t) {
  std::vector<int> out;
  for (std::int64_t e = 0; e < r.num_experts; ++e)
    if (r.map[static_cast<std::size_t>(t * r.num_experts + e)] == Route::routed)
      out.push_back(static_cast<int>(e));
  return out;
}

/// A router whose logits equal `logits` for the T = logits.size()/E tokens: H = E, W = I, x =
/// logits.
template <class Score>
Routing<double> route_logits(RouterConfig cfg, std::vector<double> const& logits,
                             std::vector<double> bias = {}) {
  auto const e = cfg.num_experts;
  TopKRouter<Exec, Score, double> router(cfg, e);
  for (int i = 0; i < e; ++i) router.weight()[static_cast<std::size_t>(i * e + i)] = 1.0;
  if (!bias.empty()) std::copy(bias.begin(), bias.end(), router.expert_bias().begin());
  return router
      .forward(std::span<double const>(logits), static_cast<std::int64_t>(logits.size()) / e)
      .routing;
}

}  // namespace

TEST_CASE("top-k breaks ties toward the lower expert id", "[moe][router]") {
  std::vector<float> v{1, 3, 3, 2, 3};
  std::vector<int> idx(3);
  top_k<float>(Exec{}, v, idx);
  CHECK(idx == std::vector<int>{1, 2, 4});
  std::vector<int> two(2);
  std::vector<float> const zeros{0, 0, 0, 0};
  top_k<float>(Exec{}, zeros, two);
  CHECK(two == std::vector<int>{0, 1});
}

TEST_CASE("group-limited top-k keeps the best groups by the sum of their top K/Gk scores",
          "[moe][router]") {
  // 4 groups of 2. K = 2, Gk = 2: group score = top-1 of the group.
  std::vector<double> v{0.1, 0.9, 0.8, 0.7, 0.85, 0.0, 0.2, 0.3};
  std::vector<int> idx(2);
  std::vector<double> scratch(8 + 4 + 2);
  group_limited_top_k<double>(Exec{}, v, 4, 2, idx, scratch);
  // Groups: {0.9}, {0.8}, {0.85}, {0.3} → keep groups 0 and 2 → experts 1 (0.9) and 4 (0.85).
  CHECK(idx == std::vector<int>{1, 4});
  // Through the router (softmax on raw logits, groups on logits).
  RouterConfig cfg{.num_experts = 8,
                   .moe_router_topk = 2,
                   .moe_router_num_groups = 4,
                   .moe_router_group_topk = 2};
  CHECK(chosen(route_logits<SoftmaxScore>(cfg, v), 0) == std::vector<int>{1, 4});
  cfg.moe_router_group_topk = 1;  // K/Gk = 2 per group: group sums 1.0, 1.5, 0.85, 0.5
  CHECK(chosen(route_logits<SoftmaxScore>(cfg, v), 0) == std::vector<int>{2, 3});
}

TEST_CASE("score functions: softmax after or before top-k, sigmoid normalized, scaling",
          "[moe][router]") {
  std::vector<double> l{0.5, 2.0, -1.0, 1.0};
  double const z = std::exp(2.0) + std::exp(1.0);
  RouterConfig cfg{.num_experts = 4, .moe_router_topk = 2};
  auto r = route_logits<SoftmaxScore>(cfg, l);
  CHECK(chosen(r, 0) == std::vector<int>{1, 3});
  CHECK(r.probs[1] == Approx(std::exp(2.0) / z));
  CHECK(r.probs[3] == Approx(std::exp(1.0) / z));
  CHECK(r.probs[0] == 0.0);

  cfg.moe_router_pre_softmax = true;
  cfg.moe_router_topk_scaling_factor = 2.5;
  r = route_logits<SoftmaxScore>(cfg, l);
  double const all = std::exp(0.5) + std::exp(2.0) + std::exp(-1.0) + std::exp(1.0);
  CHECK(r.probs[1] == Approx(2.5 * std::exp(2.0) / all));

  RouterConfig sig{
      .num_experts = 4, .moe_router_topk = 2, .moe_router_score_function = ScoreFunction::sigmoid};
  r = route_logits<SigmoidScore>(sig, l);
  auto s = [](double x) { return 1 / (1 + std::exp(-x)); };
  CHECK(r.probs[1] == Approx(s(2.0) / (s(2.0) + s(1.0))));
  sig.moe_router_topk = 1;
  r = route_logits<SigmoidScore>(sig, l);
  CHECK(r.probs[1] == Approx(s(2.0)));
}

TEST_CASE("expert bias selects but does not weight, and its update follows the sign rule",
          "[moe][router]") {
  RouterConfig cfg{.num_experts = 4,
                   .moe_router_topk = 1,
                   .moe_router_score_function = ScoreFunction::sigmoid,
                   .moe_router_enable_expert_bias = true,
                   .moe_router_bias_update_rate = 0.1};
  std::vector<double> l{0.5, 2.0, -1.0, 1.0};
  auto r = route_logits<SigmoidScore>(cfg, l, {0, 0, 0, 5});
  CHECK(chosen(r, 0) == std::vector<int>{3});
  CHECK(r.probs[3] == Approx(1 / (1 + std::exp(-1.0))));

  TopKRouter<Exec, SigmoidScore, double> router(cfg, 4);
  for (int i = 0; i < 4; ++i) router.weight()[static_cast<std::size_t>(i * 4 + i)] = 1.0;
  std::vector<double> x{0, 3, 0, 0, 0, 3, 0, 0, 0, 0, 3, 0};  // experts 1, 1, 2
  auto const routed = router.forward(std::span<double const>(x), 3);
  router.count_routed(routed.routing.tokens_per_expert());  // the MoE layer counts after dropping
  CHECK(std::vector<std::int64_t>(router.local_tokens_per_expert().begin(),
                                  router.local_tokens_per_expert().end()) ==
        std::vector<std::int64_t>{0, 2, 1, 0});
  router.update_expert_bias<inproc::Communicator>(nullptr);  // mean 0.75
  auto b = router.expert_bias();
  CHECK(b[0] == Approx(0.1));
  CHECK(b[1] == Approx(-0.1));
  CHECK(b[2] == Approx(-0.1));
  CHECK(b[3] == Approx(0.1));
  CHECK(router.local_tokens_per_expert()[1] == 0);
}

TEST_CASE("capacity and drop policies", "[moe][router][capacity]") {
  CHECK(expert_capacity(16, 2, 8, 1.0) == 4);
  CHECK(expert_capacity(10, 2, 8, 1.0) == 3);  // ceil(2.5)
  CHECK(expert_capacity(10, 2, 8, 0.5) == 2);  // ceil(1.25)
  // 5 tokens, all to expert 0 (and expert 1 for token 4), E = 2, K = 1 → C = ceil(2.5·cf).
  std::vector<int> ids{0, 0, 0, 0, 1};
  std::vector<float> p{0.2f, 0.9f, 0.5f, 0.7f, 0.3f};
  auto const r = Routing<float>::from_top_k(5, 2, 1, ids, p);
  auto kept = [](Routing<float> const& x, int e) {
    std::vector<int> t;
    for (int i = 0; i < 5; ++i)
      if (x.map[static_cast<std::size_t>(i * 2 + e)] == Route::routed) t.push_back(i);
    return t;
  };
  auto a = r;
  CHECK(apply_capacity(DropByProbs{.capacity_factor = 1.0}, a, 1) == 3);
  CHECK(kept(a, 0) == std::vector<int>{1, 2, 3});  // probs 0.9, 0.7, 0.5
  CHECK(a.probs[0] == 0.0f);
  auto b = r;
  apply_capacity(DropByPosition{.capacity_factor = 1.0}, b, 1);
  CHECK(kept(b, 0) == std::vector<int>{0, 1, 2});
  auto c = r;
  apply_capacity(DropByPosition{.capacity_factor = 1.0, .pad_to_capacity = true}, c, 1);
  CHECK(c.tokens_per_expert() == std::vector<std::int64_t>{3, 3});
  CHECK(kept(c, 1) == std::vector<int>{4});
  CHECK(c.map[1] == Route::padding);  // token 0 pads expert 1, prob 0
  CHECK(c.probs[1] == 0.0f);
  auto d = r;
  CHECK(apply_capacity(DropByProbs{.capacity_factor = 4.0}, d, 1) == 10);  // C > T: keep all
  CHECK(d.map == r.map);
  auto e = r;
  CHECK_THAT(error_of([&] {
               apply_capacity(DropByProbs{4.0, true}, e, 1);
             }),
             Contains("pad-to-capacity needs capacity C = 10 ≤ local tokens T = 5"));
  CHECK_FALSE(apply_capacity(Dropless{}, e, 1).has_value());
}

TEST_CASE("load-balancing losses and z-loss equal their formulas", "[moe][router][aux]") {
  int const E = 4, K = 2, T = 6, H = 3;
  auto const w = test::tensor<double>("w", 0, E, H);
  auto const x = test::tensor<double>("x", 0, T, H);
  RouterConfig cfg{.num_experts = E,
                   .moe_router_topk = K,
                   .moe_router_load_balancing_type = {LoadBalancingType::aux_loss,
                                                      LoadBalancingType::seq_aux_loss,
                                                      LoadBalancingType::global_aux_loss},
                   .moe_aux_loss_coeff = {0.1, 0.2, 0.3},
                   .moe_z_loss_coeff = 0.01};
  TopKRouter<Exec, SoftmaxScore, double> router(cfg, H);
  std::copy(w.begin(), w.end(), router.weight().begin());
  auto out = router.forward(std::span<double const>(x), T, ForwardContext{.batch = 2});
  // Recompute by hand: scores = softmax(x·Wᵀ), map = top-2 of scores.
  std::vector<double> s(T * E);
  std::vector<double> counts(E, 0), sums(E, 0), seq_counts(2 * E, 0), seq_sums(2 * E, 0);
  double z = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> l(E);
    for (int e = 0; e < E; ++e)
      for (int h = 0; h < H; ++h) l[e] += x[t * H + h] * w[e * H + h];
    double m = *std::max_element(l.begin(), l.end()), se = 0;
    for (int e = 0; e < E; ++e) se += std::exp(l[e] - m);
    double const lse = m + std::log(se);
    z += lse * lse;
    std::vector<int> idx(K);
    std::vector<double> sc(E);
    for (int e = 0; e < E; ++e) sc[e] = std::exp(l[e] - lse);
    top_k<double>(Exec{}, sc, idx);
    for (int i : idx) ++counts[i], ++seq_counts[(t % 2) * E + i];
    for (int e = 0; e < E; ++e) sums[e] += sc[e], seq_sums[(t % 2) * E + e] += sc[e];
  }
  auto sw = [&](std::vector<double> const& ps, std::vector<double> const& n, double ttot,
                double c) {
    double a = 0;
    for (std::size_t i = 0; i < ps.size(); ++i) a += ps[i] * n[i];
    return E * c / (K * ttot * ttot) * a;
  };
  REQUIRE(out.aux_losses.size() == 3);
  CHECK(out.aux_losses[0].value == Approx(sw(sums, counts, T, 0.1)));
  CHECK(out.aux_losses[1].value == Approx(sw(seq_sums, seq_counts, T / 2, 0.2) / 2));
  CHECK(out.aux_losses[2].value == Approx(sw(sums, counts, T, 0.3)));
  CHECK(out.z_loss == Approx(0.01 * z / T));
}

TEST_CASE("aux_loss counts are summed over tp_cp and the global aux loss over tp_dp_cp",
          "[moe][router][aux]") {
  auto const fold = FoldedMapping::from({.world = 4, .tp = 2, .ep = 4, .etp = 1});  // DP = 2
  int const E = 4, K = 2, T = 5, H = 3;
  RouterConfig cfg{.num_experts = E,
                   .moe_router_topk = K,
                   .moe_router_load_balancing_type = {LoadBalancingType::aux_loss,
                                                      LoadBalancingType::global_aux_loss},
                   .moe_aux_loss_coeff = {1.0, 1.0}};
  // Each rank's counts alone, then the reference sums them by hand over the groups.
  std::vector<std::vector<double>> counts(4), sums(4);
  for (int r = 0; r < 4; ++r) {
    TopKRouter<Exec, SoftmaxScore, double> solo(cfg, H);
    auto w = test::tensor<double>("w", 0, E, H);
    std::copy(w.begin(), w.end(), solo.weight().begin());
    auto x = test::tensor<double>("x", r, T, H);
    solo.forward(std::span<double const>(x), T);
    counts[r].assign(E, 0);
    sums[r].assign(E, 0);
    for (int t = 0; t < T; ++t) {
      std::vector<double> l(E), sc(E);
      for (int e = 0; e < E; ++e)
        for (int h = 0; h < H; ++h) l[e] += x[t * H + h] * w[e * H + h];
      ops::softmax_row<double>(l.data(), E, sc.data());
      std::vector<int> idx(K);
      top_k<double>(Exec{}, sc, idx);
      for (int i : idx) ++counts[r][i];
      for (int e = 0; e < E; ++e) sums[r][e] += sc[e];
    }
  }
  std::vector<std::vector<double>> got(4);
  test::expect_clean<test::InprocHarness>(4, [&](inproc::Communicator& world, test::RankChecks&) {
    ProcessGroups<inproc::Communicator> groups(fold, world);
    TopKRouter<Exec, SoftmaxScore, double> router(cfg, H);
    auto w = test::tensor<double>("w", 0, E, H);
    std::copy(w.begin(), w.end(), router.weight().begin());
    auto x = test::tensor<double>("x", world.rank(), T, H);
    auto out =
        router.forward(std::span<double const>(x), T,
                       RouterGroups<inproc::Communicator>{&groups.tp_cp(), &groups.tp_dp_cp()});
    for (auto const& a : out.aux_losses)
      got[static_cast<std::size_t>(world.rank())].push_back(a.value);
  });
  for (int r = 0; r < 4; ++r) {
    auto n_tp = counts[r], n_all = counts[r];
    int const tp_peer = r ^ 1;  // tp groups {0,1}, {2,3}
    for (int e = 0; e < E; ++e) {
      n_tp[e] += counts[tp_peer][e];
      n_all[e] = counts[0][e] + counts[1][e] + counts[2][e] + counts[3][e];
    }
    auto sw = [&](std::vector<double> const& n, double ttot) {
      double a = 0;
      for (int e = 0; e < E; ++e) a += sums[r][e] * n[e];
      return E * 1.0 / (K * ttot * ttot) * a;
    };
    REQUIRE(got[r].size() == 2);
    CHECK(got[r][0] == Approx(sw(n_tp, T * 2)));
    CHECK(got[r][1] == Approx(sw(n_all, T * 4)));
  }
}

namespace {

/// Central differences of L = Σ G·probs + Σ aux + z over the weight and the input, in fp64.
template <class Score>
void check_router_gradients(RouterConfig cfg, std::string const& what) {
  INFO(what);
  std::int64_t const E = cfg.num_experts, T = 6, H = 5, B = 2;
  auto const w0 = test::tensor<double>("w", 1, E, H);
  auto const x0 = test::tensor<double>("x", 1, T, H);
  auto const g = test::tensor<double>("g", 1, T, E);
  auto const bias = test::tensor<double>("b", 1, 1, E, -0.1, 0.2);
  TopKRouter<Exec, Score, double> router(cfg, H);
  auto loss = [&](std::vector<double> const& w, std::vector<double> const& x) {
    std::copy(w.begin(), w.end(), router.weight().begin());
    auto out = router.forward(std::span<double const>(x), T, ForwardContext{.batch = B});
    double l = out.z_loss;
    for (auto const& a : out.aux_losses) l += a.value;
    for (std::size_t i = 0; i < g.size(); ++i) l += g[i] * out.routing.probs[i];
    return l;
  };
  if (cfg.moe_router_enable_expert_bias)
    std::copy(bias.begin(), bias.end(), router.expert_bias().begin());
  loss(w0, x0);
  std::fill(router.weight_grad().begin(), router.weight_grad().end(), 0.0);
  std::vector<double> const dx = router.backward(g);
  std::vector<double> const dw(router.weight_grad().begin(), router.weight_grad().end());
  double const eps = 1e-6;
  std::vector<double> fd_w(dw.size()), fd_x(dx.size());
  for (std::size_t i = 0; i < dw.size(); ++i) {
    auto a = w0, b = w0;
    a[i] += eps;
    b[i] -= eps;
    fd_w[i] = (loss(a, x0) - loss(b, x0)) / (2 * eps);
  }
  for (std::size_t i = 0; i < dx.size(); ++i) {
    auto a = x0, b = x0;
    a[i] += eps;
    b[i] -= eps;
    fd_x[i] = (loss(w0, a) - loss(w0, b)) / (2 * eps);
  }
  CHECK(test::rel_error(dw, fd_w) <= 1e-6);
  CHECK(test::rel_error(dx, fd_x) <= 1e-6);
}

}  // namespace

TEST_CASE("router gradients match central differences for every score variant and loss",
          "[moe][router][gradient]") {
  using LB = LoadBalancingType;
  RouterConfig base{
      .num_experts = 8, .moe_router_topk = 3, .moe_router_load_balancing_type = {LB::none}};
  check_router_gradients<SoftmaxScore>(base, "softmax after top-k");
  auto c = base;
  c.moe_router_pre_softmax = true;
  c.moe_router_topk_scaling_factor = 1.7;
  check_router_gradients<SoftmaxScore>(c, "softmax before top-k, scaled");
  c = base;
  c.moe_router_num_groups = 4;
  c.moe_router_group_topk = 3;
  check_router_gradients<SoftmaxScore>(c, "group-limited softmax");
  c = base;
  c.moe_router_score_function = ScoreFunction::sigmoid;
  check_router_gradients<SigmoidScore>(c, "sigmoid");
  c.moe_router_enable_expert_bias = true;
  check_router_gradients<SigmoidScore>(c, "sigmoid with expert bias");
  c = base;
  c.moe_router_topk = 1;
  c.moe_router_score_function = ScoreFunction::sigmoid;
  check_router_gradients<SigmoidScore>(c, "sigmoid top-1");
  for (auto lb : {LB::aux_loss, LB::seq_aux_loss, LB::global_aux_loss}) {
    c = base;
    c.moe_router_load_balancing_type = {lb};
    c.moe_aux_loss_coeff = {0.5};
    check_router_gradients<SoftmaxScore>(c, std::string("softmax + ") + std::string(name(lb)));
    c.moe_router_score_function = ScoreFunction::sigmoid;
    check_router_gradients<SigmoidScore>(c, std::string("sigmoid + ") + std::string(name(lb)));
  }
  c = base;
  c.moe_z_loss_coeff = 0.3;
  check_router_gradients<SoftmaxScore>(c, "z-loss");
}

TEST_CASE("invalid router input gives a clear error", "[moe][router][errors]") {
  RouterConfig cfg{.num_experts = 4, .moe_router_topk = 2};
  TopKRouter<Exec, SoftmaxScore, float> router(cfg, 3);
  std::vector<float> x(6, 1.0f);
  CHECK_THAT(error_of([&] { router.forward(std::span<float const>(x), 3); }),
             Contains("input has 6 elements, expected T·H = 3·3"));
  x[4] = NAN;
  router.weight()[0] = 1.0f;
  CHECK_THAT(error_of([&] { router.forward(std::span<float const>(x), 2); }),
             Contains("logit of token 1 for expert 0 is nan"));
  x[4] = INFINITY;
  CHECK_THAT(error_of([&] { router.forward(std::span<float const>(x), 2); }),
             Contains("NaN or infinite"));
  std::vector<int> ids{0, 5};
  std::vector<float> p{0.5f, 0.5f};
  CHECK_THAT(error_of([&] { Routing<float>::from_top_k(1, 4, 2, ids, p); }),
             Contains("expert id 5 of token 0 is out of range [0, 4)"));
  ids = {1, 1};
  CHECK_THAT(error_of([&] { Routing<float>::from_top_k(1, 4, 2, ids, p); }),
             Contains("token 0 chooses expert 1 twice"));
  CHECK_THAT(error_of([&] { TopKRouter<Exec, SigmoidScore, float>(cfg, 3); }),
             Contains("is not a variant of the router's score policy"));
  CHECK_THAT(error_of([&] { RouterConfig{.num_experts = 4, .moe_router_topk = 5}.validate(); }),
             Contains("moe_router_topk (5) must be in [1, num_experts = 4]"));
  CHECK_THAT(error_of([&] { RouterConfig{.num_experts = 4, .moe_router_topk = 1}.validate(); }),
             Contains("requires moe_router_pre_softmax"));
  CHECK_THAT(error_of([&] {
               RouterConfig{.num_experts = 6,
                            .moe_router_topk = 2,
                            .moe_router_num_groups = 4,
                            .moe_router_group_topk = 2}
                   .validate();
             }),
             Contains("num_experts (6) must be divisible by moe_router_num_groups (4)"));
  CHECK_THAT(error_of([&] {
               RouterConfig{
                   .num_experts = 4, .moe_router_topk = 2, .moe_router_enable_expert_bias = true}
                   .validate();
             }),
             Contains("expert_bias requires the sigmoid score function"));
  CHECK_THAT(error_of([&] { router.backward(std::span<float const>(std::vector<float>(3))); }),
             Contains("d_probs has 3 entries"));
}
