// The router's Sinkhorn routing (Megatron's S-BASE, `moe_router_load_balancing_type = sinkhorn`)
// and its input jitter (`moe_input_jitter_eps`), each against a naive reference written from
// Megatron's description with plain loops: the logits x·Wᵀ, Megatron's `sinkhorn` loop, a top-k
// with ties to the lower id, the activation (sigmoid for top-1, softmax over all E above) and
// the jitter noise of (seed, step, layer, global token, feature). Gradients by central
// differences in fp64, and the configuration rules with their messages.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moe_test_support.hpp"
#include "moefold/moe/router.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"
#include "support/exec.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;
using Catch::Matchers::Contains;
using moefold::test::error_of;
using Exec = moefold::test::Exec;

namespace {

constexpr std::int64_t kE = 8, kT = 12, kH = 6;

/// Tokens whose feature 0 is a constant 1, and a weight that gives expert 0 a +2 bias through
/// it: the activation piles every token on expert 0, while Sinkhorn has to spread them, so
/// selecting on the one or the other gives different routings.
std::vector<double> tokens_x() {
  auto x = test::tensor<double>("sinkhorn_jitter.x", 0, kT, kH);
  for (std::int64_t t = 0; t < kT; ++t) x[static_cast<std::size_t>(t * kH)] = 1.0;
  return x;
}
std::vector<double> router_w() {
  auto w = test::tensor<double>("sinkhorn_jitter.w", 0, kE, kH);
  for (std::int64_t e = 0; e < kE; ++e) w[static_cast<std::size_t>(e * kH)] = e == 0 ? 2.0 : 0.0;
  return w;
}

RouterConfig sinkhorn_config(int k) {
  return RouterConfig{.num_experts = static_cast<int>(kE),
                      .moe_router_topk = k,
                      .moe_router_load_balancing_type = {LoadBalancingType::sinkhorn},
                      .moe_aux_loss_coeff = {0.0}};
}
/// The default router: top-k on the logits, softmax over the K chosen ones.
RouterConfig softmax_config(int k) {
  return RouterConfig{.num_experts = static_cast<int>(kE),
                      .moe_router_topk = k,
                      .moe_router_load_balancing_type = {LoadBalancingType::none}};
}

// ---- The naive reference -----------------------------------------------------------------------

/// Megatron's `sinkhorn(cost, tol)` (moe_utils.py), written from its Python:
///   cost = exp(cost); d0 = ones(T); d1 = ones(E); eps = 1e-8; error = 1e9; d1_old = d1
///   while error > tol:
///     d0 = (1 / T) * 1 / (sum(d1 * cost, 1) + eps)
///     d1 = (1 / E) * 1 / (sum(d0.unsqueeze(1) * cost, 0) + eps)
///     error = mean(abs(d1_old - d1)); d1_old = d1
///   return d1 * cost * d0.unsqueeze(1)
std::vector<std::vector<double>> naive_sinkhorn(std::vector<std::vector<double>> const& logits,
                                                double tol = 1e-4) {
  std::size_t const rows = logits.size(), cols = logits[0].size();
  auto cost = logits;
  for (auto& row : cost)
    for (auto& c : row) c = std::exp(c);
  std::vector<double> d0(rows, 1.0), d1(cols, 1.0), d1_old = d1;
  double error = 1e9;
  while (error > tol) {
    for (std::size_t t = 0; t < rows; ++t) {
      double sum = 0;
      for (std::size_t e = 0; e < cols; ++e) sum += d1[e] * cost[t][e];
      d0[t] = (1.0 / static_cast<double>(rows)) * 1 / (sum + 1e-8);
    }
    for (std::size_t e = 0; e < cols; ++e) {
      double sum = 0;
      for (std::size_t t = 0; t < rows; ++t) sum += d0[t] * cost[t][e];
      d1[e] = (1.0 / static_cast<double>(cols)) * 1 / (sum + 1e-8);
    }
    error = 0;
    for (std::size_t e = 0; e < cols; ++e) error += std::abs(d1_old[e] - d1[e]);
    error /= static_cast<double>(cols);
    d1_old = d1;
  }
  auto out = cost;
  for (std::size_t t = 0; t < rows; ++t)
    for (std::size_t e = 0; e < cols; ++e) out[t][e] = d1[e] * cost[t][e] * d0[t];
  return out;
}

/// The ids of the k largest values, the lower id first among equals.
std::vector<int> naive_top_k(std::vector<double> const& v, int k) {
  std::vector<int> ids;
  std::vector<bool> taken(v.size(), false);
  for (int n = 0; n < k; ++n) {
    int best = -1;
    for (std::size_t e = 0; e < v.size(); ++e)
      if (!taken[e] && (best < 0 || v[e] > v[static_cast<std::size_t>(best)]))
        best = static_cast<int>(e);
    taken[static_cast<std::size_t>(best)] = true;
    ids.push_back(best);
  }
  return ids;
}

/// How the reference routes.
enum class Rule {
  sinkhorn_train,  ///< S-BASE training: top-k on sinkhorn(logits), probs = activation
  sinkhorn_eval,   ///< S-BASE evaluation: top-k on the activation, probs = activation
  softmax_topk,    ///< the default: top-k on the logits, softmax over the K chosen
};

struct NaiveRouting {
  std::vector<std::vector<int>> chosen;  ///< per token, the K chosen experts
  std::vector<double> probs;             ///< [T, E], 0 outside the chosen
  double margin = 0;  ///< smallest gap between a chosen and an unchosen selection value
};

/// The routing of `x [T, H]` (multiplied elementwise by `noise` when given) with weight `w [E, H]`.
NaiveRouting naive_route(Rule rule, int k, std::vector<double> const& x,
                         std::vector<double> const& w, std::vector<double> const& noise = {}) {
  auto const T = static_cast<std::size_t>(kT), E = static_cast<std::size_t>(kE),
             H = static_cast<std::size_t>(kH);
  std::vector<std::vector<double>> logits(T, std::vector<double>(E, 0.0));
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t e = 0; e < E; ++e)
      for (std::size_t h = 0; h < H; ++h) {
        double const xi = noise.empty() ? x[t * H + h] : x[t * H + h] * noise[t * H + h];
        logits[t][e] += xi * w[e * H + h];
      }
  auto activation = logits;
  for (auto& row : activation) {
    if (k == 1) {
      for (auto& v : row) v = 1 / (1 + std::exp(-v));
    } else {
      double sum = 0;
      for (double v : row) sum += std::exp(v);
      for (auto& v : row) v = std::exp(v) / sum;
    }
  }
  auto const selection = rule == Rule::sinkhorn_train  ? naive_sinkhorn(logits)
                         : rule == Rule::sinkhorn_eval ? activation
                                                       : logits;
  NaiveRouting out;
  out.probs.assign(T * E, 0.0);
  out.margin = INFINITY;
  for (std::size_t t = 0; t < T; ++t) {
    auto const ids = naive_top_k(selection[t], k);
    auto const is_chosen = [&](std::size_t e) {
      return std::find(ids.begin(), ids.end(), static_cast<int>(e)) != ids.end();
    };
    double lowest_chosen = INFINITY, highest_other = -INFINITY;
    for (std::size_t e = 0; e < E; ++e) {
      if (is_chosen(e))
        lowest_chosen = std::min(lowest_chosen, selection[t][e]);
      else
        highest_other = std::max(highest_other, selection[t][e]);
    }
    out.margin = std::min(out.margin, lowest_chosen - highest_other);
    double chosen_sum = 0;
    for (std::size_t e = 0; e < E; ++e)
      if (is_chosen(e)) chosen_sum += std::exp(logits[t][e]);
    for (std::size_t e = 0; e < E; ++e)
      if (is_chosen(e))
        out.probs[t * E + e] =
            rule == Rule::softmax_topk ? std::exp(logits[t][e]) / chosen_sum : activation[t][e];
    out.chosen.push_back(ids);
  }
  return out;
}

/// The noise of the router's input jitter, [T, H], keyed as the router keys it.
std::vector<double> jitter_noise(std::uint64_t seed, std::int64_t step,
                                 std::string const& weight_name,
                                 std::vector<std::int64_t> const& token_index, double eps) {
  std::vector<double> noise(static_cast<std::size_t>(kT * kH));
  for (std::int64_t t = 0; t < kT; ++t)
    for (std::int64_t h = 0; h < kH; ++h)
      noise[static_cast<std::size_t>(t * kH + h)] =
          jitter_factor(seed, static_cast<std::uint64_t>(step), detail::hash_name(weight_name),
                        static_cast<std::uint64_t>(token_index[static_cast<std::size_t>(t)]),
                        static_cast<std::uint64_t>(h), eps);
  return noise;
}

/// The map exactly, and the probabilities within 1e-12.
void check_equal(Routing<double> const& got, NaiveRouting const& want) {
  REQUIRE(got.num_tokens == kT);
  REQUIRE(got.num_experts == kE);
  for (std::int64_t t = 0; t < kT; ++t)
    for (std::int64_t e = 0; e < kE; ++e) {
      CAPTURE(t, e);
      auto const at = static_cast<std::size_t>(t * kE + e);
      auto const& ids = want.chosen[static_cast<std::size_t>(t)];
      bool const chosen = std::find(ids.begin(), ids.end(), e) != ids.end();
      CHECK(got.map[at] == (chosen ? Route::routed : Route::none));
      CHECK(std::abs(got.probs[at] - want.probs[at]) <= 1e-12);
    }
}

bool same_choice(NaiveRouting const& a, NaiveRouting const& b) {
  for (std::size_t t = 0; t < a.chosen.size(); ++t) {
    auto x = a.chosen[t], y = b.chosen[t];
    std::sort(x.begin(), x.end());
    std::sort(y.begin(), y.end());
    if (x != y) return false;
  }
  return true;
}

template <class Score>
TopKRouter<Exec, Score, double> make_router(RouterConfig const& cfg, std::vector<double> const& w,
                                            std::string name = "router.weight",
                                            std::uint64_t seed = 0) {
  TopKRouter<Exec, Score, double> router(cfg, kH, std::move(name), seed);
  std::copy(w.begin(), w.end(), router.weight().begin());
  return router;
}

/// Central differences of L = Σ G·probs over the router's weight and input, against its
/// backward, for the forward `ctx` (the selection must not flip under ±1e-6: check the margin).
template <class Score>
void check_gradients(TopKRouter<Exec, Score, double>& router, std::vector<double> w,
                     std::vector<double> x, ForwardContext const& ctx) {
  auto const g = test::tensor<double>("sinkhorn_jitter.g", 0, kT, kE);
  auto const loss = [&] {
    std::copy(w.begin(), w.end(), router.weight().begin());
    auto const out = router.forward(std::span<double const>(x), kT, ctx);
    double l = 0;
    for (std::size_t i = 0; i < g.size(); ++i) l += g[i] * out.routing.probs[i];
    return l;
  };
  (void)loss();
  std::fill(router.weight_grad().begin(), router.weight_grad().end(), 0.0);
  std::vector<double> const dx = router.backward(std::span<double const>(g));
  std::vector<double> const dw(router.weight_grad().begin(), router.weight_grad().end());
  std::vector<double> fd_w(w.size()), fd_x(x.size());
  for (std::size_t i = 0; i < w.size(); ++i) fd_w[i] = test::central_difference(w[i], loss);
  for (std::size_t i = 0; i < x.size(); ++i) fd_x[i] = test::central_difference(x[i], loss);
  CHECK(test::rel_error(dw, fd_w) <= 1e-6);
  CHECK(test::rel_error(dx, fd_x) <= 1e-6);
}

/// The `invalid_config` message of building a router with `cfg`, or why there is none.
std::string config_error(RouterConfig const& cfg) {
  try {
    TopKRouter<Exec, SoftmaxScore, double> router(cfg, kH);
  } catch (invalid_config const& e) {
    return e.what();
  } catch (std::exception const& e) {
    return std::string("not invalid_config: ") + e.what();
  }
  return "no error";
}

}  // namespace

// ---- Sinkhorn routing --------------------------------------------------------------------------

TEST_CASE("sinkhorn routing selects on sinkhorn(logits) in training and weights by the activation",
          "[moe][router][sinkhorn]") {
  auto const x = tokens_x();
  auto const w = router_w();
  for (int k : {1, 2}) {
    CAPTURE(k);
    auto const want = naive_route(Rule::sinkhorn_train, k, x, w);
    // The data are chosen so that the activation would choose otherwise.
    REQUIRE_FALSE(same_choice(want, naive_route(Rule::sinkhorn_eval, k, x, w)));
    auto router = make_router<SoftmaxScore>(sinkhorn_config(k), w);
    check_equal(router.forward(std::span<double const>(x), kT, {.microbatch = 0}).routing, want);
    // A recompute selects as its train forward did.
    check_equal(router
                    .forward(std::span<double const>(x), kT,
                             {.mode = ForwardMode::recompute, .microbatch = 0})
                    .routing,
                want);
  }
}

TEST_CASE("sinkhorn routing selects on the activation in evaluation", "[moe][router][sinkhorn]") {
  auto const x = tokens_x();
  auto const w = router_w();
  for (int k : {1, 2}) {
    CAPTURE(k);
    auto router = make_router<SoftmaxScore>(sinkhorn_config(k), w);
    auto const out = router.forward(std::span<double const>(x), kT, {.mode = ForwardMode::eval});
    check_equal(out.routing, naive_route(Rule::sinkhorn_eval, k, x, w));
    CHECK(out.aux_losses.empty());
  }
}

TEST_CASE("sinkhorn routing's gradients agree with central differences (fp64)",
          "[moe][router][sinkhorn][gradient]") {
  auto const x = tokens_x();
  auto const w = router_w();
  for (int k : {1, 2})
    for (auto mode : {ForwardMode::train, ForwardMode::eval}) {
      CAPTURE(k, mode == ForwardMode::train);
      auto const rule = mode == ForwardMode::train ? Rule::sinkhorn_train : Rule::sinkhorn_eval;
      // ±1e-6 moves a Sinkhorn value by far less than the gap: the selection stays fixed.
      REQUIRE(naive_route(rule, k, x, w).margin > 1e-4);
      auto router = make_router<SoftmaxScore>(sinkhorn_config(k), w);
      check_gradients(router, w, x, {.mode = mode});
    }
}

TEST_CASE("sinkhorn routing refuses an aux loss, a capacity factor and other balancing types",
          "[moe][router][sinkhorn][errors]") {
  auto c = sinkhorn_config(2);
  CHECK(config_error(c) == "no error");
  c.moe_aux_loss_coeff = {0.01};
  CHECK_THAT(config_error(c),
             Contains("Sinkhorn routing does not support an aux loss: moe_aux_loss_coeff must be "
                      "0 (got 0.01)"));
  c = sinkhorn_config(2);
  c.moe_expert_capacity_factor = 1.0;
  CHECK_THAT(config_error(c),
             Contains("moe_expert_capacity_factor needs the aux_loss, seq_aux_loss, "
                      "global_aux_loss or none load-balancing type (got sinkhorn)"));
  c = sinkhorn_config(2);
  c.moe_router_load_balancing_type = {LoadBalancingType::aux_loss, LoadBalancingType::sinkhorn};
  CHECK_THAT(config_error(c),
             Contains("moe_router_load_balancing_type sinkhorn is a routing type and must be the "
                      "only one (got 2 types)"));
  c.moe_router_load_balancing_type = {LoadBalancingType::sinkhorn, LoadBalancingType::none};
  CHECK_THAT(config_error(c), Contains("must be the only one (got 2 types)"));
  c = sinkhorn_config(2);
  c.moe_router_num_groups = 4;
  c.moe_router_group_topk = 2;
  CHECK_THAT(config_error(c), Contains("Sinkhorn routing takes no group-limited top-k"));
}

// ---- Input jitter ------------------------------------------------------------------------------

namespace {
constexpr std::uint64_t kSeed = 2024;
constexpr std::int64_t kStep = 7;
constexpr double kEps = 0.1;
std::string const kWeightName = "layers.3.mlp.router.weight";

/// Global token indices that are neither 0-based nor contiguous, as a rank's shard would hold.
std::vector<std::int64_t> token_index() {
  std::vector<std::int64_t> index(kT);
  for (std::int64_t t = 0; t < kT; ++t) index[static_cast<std::size_t>(t)] = 1000 + 3 * t;
  return index;
}

RouterConfig with_jitter(RouterConfig c) {
  c.moe_input_jitter_eps = kEps;
  return c;
}
}  // namespace

TEST_CASE("input jitter: the router routes x ⊙ noise(seed, step, layer, token, feature)",
          "[moe][router][jitter]") {
  auto const x = tokens_x();
  auto const w = router_w();
  auto const index = token_index();
  auto const noise = jitter_noise(kSeed, kStep, kWeightName, index, kEps);
  ForwardContext const train{.step = kStep, .token_index = index};
  SECTION("the default softmax router") {
    auto router = make_router<SoftmaxScore>(with_jitter(softmax_config(2)), w, kWeightName, kSeed);
    auto const want = naive_route(Rule::softmax_topk, 2, x, w, noise);
    check_equal(router.forward(std::span<double const>(x), kT, train).routing, want);
    // The noise matters: without it the probabilities differ.
    auto const plain = naive_route(Rule::softmax_topk, 2, x, w);
    CHECK(test::rel_error(plain.probs, want.probs) > 1e-3);
  }
  SECTION("sinkhorn routing, train and recompute forwards") {
    for (int k : {1, 2}) {
      CAPTURE(k);
      auto router =
          make_router<SoftmaxScore>(with_jitter(sinkhorn_config(k)), w, kWeightName, kSeed);
      auto const want = naive_route(Rule::sinkhorn_train, k, x, w, noise);
      auto train0 = train;
      train0.microbatch = 0;
      check_equal(router.forward(std::span<double const>(x), kT, train0).routing, want);
      auto recompute = train0;
      recompute.mode = ForwardMode::recompute;
      check_equal(router.forward(std::span<double const>(x), kT, recompute).routing, want);
    }
  }
}

TEST_CASE("input jitter is off in evaluation: the router equals the one without jitter",
          "[moe][router][jitter]") {
  auto const x = tokens_x();
  auto const w = router_w();
  auto const index = token_index();
  for (auto const& cfg : {softmax_config(2), sinkhorn_config(2), sinkhorn_config(1)}) {
    auto jittered = make_router<SoftmaxScore>(with_jitter(cfg), w, kWeightName, kSeed);
    auto plain = make_router<SoftmaxScore>(cfg, w, kWeightName, kSeed);
    ForwardContext const eval{.mode = ForwardMode::eval, .step = kStep, .token_index = index};
    auto const got = jittered.forward(std::span<double const>(x), kT, eval).routing;
    auto const want = plain.forward(std::span<double const>(x), kT, eval).routing;
    CHECK(got.map == want.map);
    CHECK(got.probs == want.probs);
    // An eval forward needs no token indices.
    CHECK(jittered.forward(std::span<double const>(x), kT, {.mode = ForwardMode::eval})
              .routing.probs == want.probs);
  }
}

TEST_CASE("input jitter needs the global index of every token of a training forward",
          "[moe][router][jitter][errors]") {
  auto const x = tokens_x();
  auto router = make_router<SoftmaxScore>(with_jitter(softmax_config(2)), router_w());
  CHECK_THAT(error_of([&] { router.forward(std::span<double const>(x), kT, {.step = kStep}); }),
             Contains("moe_input_jitter_eps needs the global index of each of the 12 tokens "
                      "(ForwardContext::token_index has 0)"));
  std::vector<std::int64_t> const short_index(5, 0);
  CHECK_THAT(error_of([&] {
               router.forward(std::span<double const>(x), kT, {.token_index = short_index});
             }),
             Contains("each of the 12 tokens (ForwardContext::token_index has 5)"));
}

TEST_CASE("input jitter's gradients agree with central differences (fp64, noise fixed)",
          "[moe][router][jitter][gradient]") {
  // The noise depends on the token's global index, not on x: L(x, W) stays differentiable.
  auto const x = tokens_x();
  auto const w = router_w();
  auto const index = token_index();
  auto const noise = jitter_noise(kSeed, kStep, kWeightName, index, kEps);
  ForwardContext const train{.step = kStep, .token_index = index};
  SECTION("the default softmax router") {
    REQUIRE(naive_route(Rule::softmax_topk, 2, x, w, noise).margin > 1e-4);
    auto router = make_router<SoftmaxScore>(with_jitter(softmax_config(2)), w, kWeightName, kSeed);
    check_gradients(router, w, x, train);
  }
  SECTION("sinkhorn routing") {
    REQUIRE(naive_route(Rule::sinkhorn_train, 2, x, w, noise).margin > 1e-4);
    auto router = make_router<SoftmaxScore>(with_jitter(sinkhorn_config(2)), w, kWeightName, kSeed);
    check_gradients(router, w, x, train);
  }
}
