// Router options outside top-k scoring: Sinkhorn balancing (S-BASE), checked against a direct
// restatement of Megatron's loop, a hand-computed 2×2 case, the closed-form 2×2 fixed point and
// its marginals; and the input jitter, checked for range, determinism, folding independence,
// sensitivity to every key component and the moments of a uniform distribution.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "moefold/core/init.hpp"
#include "moefold/moe/input_jitter.hpp"
#include "moefold/moe/sinkhorn.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"
#include "support/exec.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;
using Catch::Matchers::Contains;
using moefold::test::error_of;

namespace {

/// Deterministic N(0, scale²) logits, [tokens, experts] row-major.
std::vector<double> normal_logits(std::int64_t tokens, std::int64_t experts, double scale,
                                  char const* name = "router_options.logits") {
  std::vector<double> v(static_cast<std::size_t>(tokens * experts));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = init_value(7, name, i, InitDist::normal, scale);
  return v;
}

/// Megatron's `sinkhorn(cost, tol)` restated line by line on a matrix of rows, as the Python
/// reads: cost = exp(cost); d0, d1 = ones; loop while error > tol.
struct ReferenceSinkhorn {
  std::vector<std::vector<double>> result;
  std::int64_t iterations = 0;
};
ReferenceSinkhorn reference_sinkhorn(std::vector<double> const& logits, std::size_t rows,
                                     std::size_t cols, double tol) {
  std::vector<std::vector<double>> cost(rows, std::vector<double>(cols));
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) cost[r][c] = std::exp(logits[r * cols + c]);
  std::vector<double> d0(rows, 1.0), d1(cols, 1.0);
  double const eps = 0.00000001;
  double error = 1e9;
  std::vector<double> d1_old = d1;
  ReferenceSinkhorn ref;
  while (error > tol) {
    for (std::size_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (std::size_t c = 0; c < cols; ++c) sum += d1[c] * cost[r][c];
      d0[r] = (1.0 / static_cast<double>(rows)) * 1 / (sum + eps);
    }
    for (std::size_t c = 0; c < cols; ++c) {
      double sum = 0;
      for (std::size_t r = 0; r < rows; ++r) sum += d0[r] * cost[r][c];
      d1[c] = (1.0 / static_cast<double>(cols)) * 1 / (sum + eps);
    }
    error = 0;
    for (std::size_t c = 0; c < cols; ++c) error += std::abs(d1_old[c] - d1[c]);
    error /= static_cast<double>(cols);
    d1_old = d1;
    ++ref.iterations;
  }
  ref.result.assign(rows, std::vector<double>(cols));
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t c = 0; c < cols; ++c) ref.result[r][c] = d1[c] * cost[r][c] * d0[r];
  return ref;
}

std::vector<double> run_sinkhorn(std::vector<double> const& logits, std::int64_t tokens,
                                 std::int64_t experts, double tol = 1e-4,
                                 std::int64_t* iterations = nullptr) {
  std::vector<double> out(logits.size());
  auto const it = sinkhorn<double>(test::Exec{}, logits, tokens, experts, out, tol);
  if (iterations) *iterations = it;
  return out;
}

double row_sum(std::vector<double> const& m, std::int64_t experts, std::int64_t t) {
  auto const begin = m.begin() + t * experts;
  return std::accumulate(begin, begin + experts, 0.0);
}
double column_sum(std::vector<double> const& m, std::int64_t tokens, std::int64_t experts,
                  std::int64_t e) {
  double s = 0;
  for (std::int64_t t = 0; t < tokens; ++t) s += m[static_cast<std::size_t>(t * experts + e)];
  return s;
}

}  // namespace

// ---- Sinkhorn ----------------------------------------------------------------------------------

TEST_CASE("sinkhorn equals a line-by-line restatement of Megatron's loop, iterations included") {
  std::int64_t const tokens = 16, experts = 8;
  auto const logits = normal_logits(tokens, experts, 1.5);
  for (double tol : {1e-2, 1e-4, 1e-6}) {
    CAPTURE(tol);
    std::int64_t iterations = 0;
    auto const out = run_sinkhorn(logits, tokens, experts, tol, &iterations);
    auto const ref = reference_sinkhorn(logits, 16, 8, tol);
    CHECK(iterations == ref.iterations);
    CHECK(iterations >= 1);
    for (std::size_t t = 0; t < 16; ++t)
      for (std::size_t e = 0; e < 8; ++e)
        CHECK(out[t * 8 + e] == Approx(ref.result[t][e]).epsilon(1e-12));
  }
}

TEST_CASE("one sinkhorn iteration on exp-cost [[4, 1], [1, 1]] gives [[4/13, 1/7], [5/26, 5/14]]") {
  // By hand, with d1 = 1: row sums 5 and 2 give d0 = (1/2)/(5, 2) = (1/10, 1/4); column sums of
  // d0·C are 4/10 + 1/4 = 13/20 and 1/10 + 1/4 = 7/20, so d1 = (1/2)/(13/20, 7/20) = (10/13,
  // 10/7). The mean change |1 − d1| = (3/13 + 3/7)/2 ≈ 0.33 is below tol = 1, so the loop stops.
  std::vector<double> const logits = {std::log(4.0), 0.0, 0.0, 0.0};
  std::int64_t iterations = 0;
  auto const out = run_sinkhorn(logits, 2, 2, /*tol=*/1.0, &iterations);
  CHECK(iterations == 1);
  CHECK(out[0] == Approx(4.0 / 13).epsilon(1e-7));
  CHECK(out[1] == Approx(1.0 / 7).epsilon(1e-7));
  CHECK(out[2] == Approx(5.0 / 26).epsilon(1e-7));
  CHECK(out[3] == Approx(5.0 / 14).epsilon(1e-7));
  // The column step ran last, so the columns are balanced and the rows not yet.
  CHECK(out[0] + out[2] == Approx(0.5).epsilon(1e-7));
  CHECK(out[0] + out[1] == Approx(41.0 / 91).epsilon(1e-7));
}

TEST_CASE("a converged 2x2 sinkhorn reaches the closed-form balanced matrix") {
  // Row and column sums of 1/2 force [[p, 1/2 − p], [1/2 − p, p]]; diagonal scaling keeps the
  // cross ratio, so p² / (1/2 − p)² = ad / bc for cost [[a, b], [c, d]].
  auto const closed_form = [](std::vector<double> const& logits) {
    double const r = std::exp((logits[0] + logits[3] - logits[1] - logits[2]) / 2);
    return r / (2 * (1 + r));
  };
  for (auto const& logits :
       {std::vector<double>{std::log(4.0), 0, 0, 0}, std::vector<double>{0.3, -1.2, 0.7, 2.0}}) {
    auto const out = run_sinkhorn(logits, 2, 2, /*tol=*/1e-7);
    double const p = closed_form(logits);
    CHECK(out[0] == Approx(p).epsilon(1e-6));
    CHECK(out[1] == Approx(0.5 - p).epsilon(1e-6));
    CHECK(out[2] == Approx(0.5 - p).epsilon(1e-6));
    CHECK(out[3] == Approx(p).epsilon(1e-6));
  }
  CHECK(run_sinkhorn({std::log(4.0), 0, 0, 0}, 2, 2, 1e-7)[0] == Approx(1.0 / 3).epsilon(1e-6));
}

TEST_CASE("sinkhorn columns sum to 1/E, and its rows to 1/T within a bound proportional to tol") {
  std::int64_t const tokens = 32, experts = 8;
  auto const logits = normal_logits(tokens, experts, 1.0);
  double previous_row_error = 1;
  for (double tol : {1e-3, 1e-4, 1e-5, 1e-6}) {
    CAPTURE(tol);
    auto const out = run_sinkhorn(logits, tokens, experts, tol);
    // Columns: exact up to the 1e-8 guard, since the column step runs last.
    for (std::int64_t e = 0; e < experts; ++e)
      CHECK(column_sum(out, tokens, experts, e) * experts == Approx(1.0).epsilon(1e-6));
    // Rows: T·row − 1 is the relative change of d1 in the last step, weighted by the row; the
    // mean |Δd1| is ≤ tol and d1 is O(1) here, so it stays below E·tol.
    double row_error = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      row_error = std::max(row_error, std::abs(row_sum(out, experts, t) * tokens - 1));
    CHECK(row_error <= experts * tol);
    CHECK(row_error < previous_row_error);
    previous_row_error = row_error;
  }
}

TEST_CASE("adding a constant to every logit leaves sinkhorn unchanged") {
  // exp(x + c) = e^c · exp(x): d0 absorbs the factor and d1 never sees it.
  std::int64_t const tokens = 12, experts = 6;
  auto const logits = normal_logits(tokens, experts, 2.0);
  std::int64_t base_iterations = 0;
  auto const base = run_sinkhorn(logits, tokens, experts, 1e-6, &base_iterations);
  for (double c : {-4.0, 3.0, 9.0}) {
    CAPTURE(c);
    auto shifted = logits;
    for (auto& v : shifted) v += c;
    std::int64_t iterations = 0;
    auto const out = run_sinkhorn(shifted, tokens, experts, 1e-6, &iterations);
    CHECK(iterations == base_iterations);
    for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i] == Approx(base[i]).epsilon(1e-6));
  }
}

TEST_CASE("sinkhorn spreads top-1 choices that the raw logits would pile on one expert") {
  // Every token prefers expert 0 by a margin of 3; balancing should move most of them off it.
  std::int64_t const tokens = 16, experts = 4;
  auto logits = normal_logits(tokens, experts, 0.5);
  for (std::int64_t t = 0; t < tokens; ++t) logits[static_cast<std::size_t>(t * experts)] += 3;
  auto const out = run_sinkhorn(logits, tokens, experts);
  std::vector<int> raw_load(experts), balanced_load(experts);
  for (std::int64_t t = 0; t < tokens; ++t) {
    auto const row = static_cast<std::ptrdiff_t>(t * experts);
    ++raw_load[static_cast<std::size_t>(
        std::max_element(logits.begin() + row, logits.begin() + row + experts) - logits.begin() -
        row)];
    ++balanced_load[static_cast<std::size_t>(
        std::max_element(out.begin() + row, out.begin() + row + experts) - out.begin() - row)];
  }
  CHECK(raw_load[0] == tokens);
  CHECK(*std::max_element(balanced_load.begin(), balanced_load.end()) <= 2 * tokens / experts);
  CHECK(*std::min_element(balanced_load.begin(), balanced_load.end()) >= 1);
}

TEST_CASE("sinkhorn computes in double for float input and rounds once") {
  std::int64_t const tokens = 10, experts = 5;
  auto const logits = normal_logits(tokens, experts, 1.0);
  std::vector<float> logits_f(logits.begin(), logits.end()), out_f(logits.size());
  auto const iterations_f = sinkhorn<float>(test::Exec{}, logits_f, tokens, experts, out_f);
  std::vector<double> const rounded(logits_f.begin(), logits_f.end());
  std::int64_t iterations = 0;
  auto const out = run_sinkhorn(rounded, tokens, experts, 1e-4, &iterations);
  CHECK(iterations_f == iterations);
  for (std::size_t i = 0; i < out.size(); ++i) CHECK(out_f[i] == static_cast<float>(out[i]));
}

TEST_CASE("sinkhorn may write its result over its logits") {
  auto logits = normal_logits(6, 3, 1.0);
  auto const expected = run_sinkhorn(logits, 6, 3);
  sinkhorn<double>(test::Exec{}, logits, 6, 3, logits);
  CHECK(logits == expected);
}

TEST_CASE("a tol below the drift of the 1e-8 guards is never reached, and sinkhorn says so") {
  // The guards break the d0·k, d1/k symmetry: d1 keeps drifting by ~1e-8 per iteration, so
  // Megatron's loop would spin forever; ours stops at max_iterations with an error.
  std::vector<double> const logits = {std::log(4.0), 0, 0, 0};
  std::vector<double> out(4);
  CHECK(sinkhorn<double>(test::Exec{}, logits, 2, 2, out, 1e-6, 100000) < 100000);
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, logits, 2, 2, out, 1e-10, 100000); }),
             Contains("still above tol = 1e-10 after 100000 iterations"));
}

TEST_CASE("sinkhorn of zero tokens writes nothing and runs no iteration") {
  std::vector<double> empty;
  CHECK(sinkhorn<double>(test::Exec{}, empty, 0, 8, empty) == 0);
}

TEST_CASE("sinkhorn rejects a wrong shape, a non-positive tol and a loop that will not converge") {
  std::vector<double> logits(12), out(12), short_buffer(11);
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, short_buffer, 3, 4, out); }),
             Contains("logits hold 11 values, but 3 tokens × 4 experts need 12"));
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, logits, 3, 4, short_buffer); }),
             Contains("out holds 11 values, but 3 tokens × 4 experts need 12"));
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, logits, 12, 0, out); }),
             Contains("12 tokens and 0 experts"));
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, logits, -3, 4, out); }),
             Contains("-3 tokens and 4 experts"));
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, logits, 3, 4, out, 0.0); }),
             Contains("tol 0 must be positive"));
  std::vector<double> skewed = {std::log(4.0), 0, 0, 0}, out4(4);
  CHECK_THAT(error_of([&] { sinkhorn<double>(test::Exec{}, skewed, 2, 2, out4, 1e-12, 3); }),
             Contains("after 3 iterations (2 tokens × 2 experts)"));
}

// ---- Input jitter ------------------------------------------------------------------------------

static_assert(jitter_factor(1, 2, 3, 4, 5, 0.0) == 1.0, "eps = 0 is the identity");
static_assert(jitter_factor(1, 2, 3, 4, 5, 0.25) >= 0.75 &&
              jitter_factor(1, 2, 3, 4, 5, 0.25) <= 1.25);

TEST_CASE("jitter factors lie in [1 − eps, 1 + eps] and fill that range") {
  double const eps = 0.1;
  double lo = 2, hi = 0;
  for (std::uint64_t token = 0; token < 512; ++token)
    for (std::uint64_t feature = 0; feature < 256; ++feature) {
      double const f = jitter_factor(42, 7, 3, token, feature, eps);
      lo = std::min(lo, f);
      hi = std::max(hi, f);
    }
  CHECK(lo >= 1 - eps);
  CHECK(hi <= 1 + eps);
  CHECK(lo < 1 - eps + 1e-3);
  CHECK(hi > 1 + eps - 1e-3);
}

TEST_CASE("the jitter factor is a pure function of seed, step, layer, token and feature") {
  for (std::uint64_t token : {0ull, 1ull, 123456789ull})
    CHECK(jitter_factor(5, 6, 7, token, 9, 0.01) == jitter_factor(5, 6, 7, token, 9, 0.01));
}

TEST_CASE("changing any one component of the jitter key changes the factor") {
  struct Key {
    std::uint64_t c[5];
  };
  auto const factor = [](Key const& k) {
    return jitter_factor(k.c[0], k.c[1], k.c[2], k.c[3], k.c[4], 0.5);
  };
  for (Key const base : {Key{{0, 0, 0, 0, 0}}, Key{{42, 1000, 3, 77, 511}},
                         Key{{~0ull, 1ull << 40, 12345, 1ull << 33, 4095}}}) {
    for (int i = 0; i < 5; ++i)
      for (std::uint64_t delta : {1ull, 2ull, 1ull << 32, 1ull << 63}) {
        CAPTURE(i, delta);
        Key changed = base;
        changed.c[i] ^= delta;
        CHECK(factor(changed) != factor(base));
      }
  }
  // Order matters: token 3, feature 5 is not token 5, feature 3 (nor step and layer swapped).
  CHECK(jitter_factor(1, 2, 3, 3, 5, 0.5) != jitter_factor(1, 2, 3, 5, 3, 0.5));
  CHECK(jitter_factor(1, 2, 3, 4, 5, 0.5) != jitter_factor(1, 3, 2, 4, 5, 0.5));
}

TEST_CASE("jitter factors are uniform: mean 1, variance eps²/3, neighbours uncorrelated") {
  // With u = (f − 1)/eps uniform in [−1, 1): E u = 0, E u² = 1/3 (σ of the estimate √(4/45/N)),
  // and neighbouring features or tokens have correlation ≈ 0 (σ ≈ 1/√N). Bounds are 5σ.
  double const eps = 0.02;
  std::size_t const tokens = 1024, hidden = 256, n = tokens * hidden;
  std::vector<double> u(n);
  for (std::size_t t = 0; t < tokens; ++t)
    for (std::size_t h = 0; h < hidden; ++h)
      u[t * hidden + h] = (jitter_factor(3, 11, 2, t, h, eps) - 1) / eps;
  double mean = 0, second = 0, next_feature = 0, next_token = 0;
  for (std::size_t i = 0; i < n; ++i) {
    mean += u[i];
    second += u[i] * u[i];
    if (i % hidden + 1 < hidden) next_feature += u[i] * u[i + 1];
    if (i + hidden < n) next_token += u[i] * u[i + hidden];
  }
  auto const N = static_cast<double>(n);
  mean /= N;
  second /= N;
  CHECK(std::abs(mean) < 5 * std::sqrt(1.0 / 3 / N));
  CHECK(std::abs(second - 1.0 / 3) < 5 * std::sqrt(4.0 / 45 / N));
  // Correlation = E[u u'] / E[u²].
  CHECK(std::abs(next_feature / N / (1.0 / 3)) < 5 / std::sqrt(N));
  CHECK(std::abs(next_token / N / (1.0 / 3)) < 5 / std::sqrt(N));
  // The same in the variable Megatron uses: the factor's variance is eps²/3.
  CHECK(second * eps * eps == Approx(eps * eps / 3).epsilon(0.01));
}

TEST_CASE("apply_input_jitter with eps = 0 returns its input exactly") {
  auto const x = normal_logits(5, 7, 3.0, "router_options.x");
  std::vector<std::int64_t> const ids = {10, 11, 12, 500, 3};
  std::vector<double> out(x.size());
  apply_input_jitter<double>(test::Exec{}, {.seed = 1, .step = 2, .layer_key = 3}, x, ids, 7, 0.0,
                             out);
  CHECK(out == x);
  std::vector<float> xf(x.begin(), x.end()), outf(x.size());
  apply_input_jitter<float>(test::Exec{}, {.seed = 1, .step = 2, .layer_key = 3}, xf, ids, 7, 0.0,
                            outf);
  CHECK(outf == xf);
}

TEST_CASE("apply_input_jitter multiplies element (t, h) by the factor of (token id t, feature h)") {
  JitterKey const key{.seed = 99, .step = 4, .layer_key = 17};
  std::int64_t const hidden = 6;
  std::vector<std::int64_t> const ids = {40, 2, 41, 1000000007};
  auto const x = normal_logits(4, hidden, 1.0, "router_options.x");
  std::vector<double> out(x.size());
  apply_input_jitter<double>(test::Exec{}, key, x, ids, hidden, 0.05, out);
  std::vector<float> xf(x.begin(), x.end()), outf(x.size());
  apply_input_jitter<float>(test::Exec{}, key, xf, ids, hidden, 0.05, outf);
  for (std::size_t t = 0; t < ids.size(); ++t)
    for (std::size_t h = 0; h < static_cast<std::size_t>(hidden); ++h) {
      double const f = jitter_factor(99, 4, 17, static_cast<std::uint64_t>(ids[t]), h, 0.05);
      auto const i = t * static_cast<std::size_t>(hidden) + h;
      CHECK(out[i] == x[i] * f);
      CHECK(outf[i] == static_cast<float>(static_cast<double>(xf[i]) * f));
    }
}

TEST_CASE("a token's jitter does not depend on the rank holding it or its place in the batch") {
  // The whole batch on one rank versus two shards holding the tokens in another order, as a
  // different folding would, and in place.
  JitterKey const key{.seed = 5, .step = 8, .layer_key = 2};
  std::int64_t const hidden = 4;
  std::vector<std::int64_t> const all_ids = {0, 1, 2, 3, 4, 5};
  auto const x = normal_logits(6, hidden, 1.0, "router_options.x");
  std::vector<double> whole(x.size());
  apply_input_jitter<double>(test::Exec{}, key, x, all_ids, hidden, 0.1, whole);
  auto const row = [&](std::vector<double> const& m, std::int64_t t) {
    return std::vector<double>(m.begin() + t * hidden, m.begin() + (t + 1) * hidden);
  };
  for (std::vector<std::int64_t> const& shard :
       {std::vector<std::int64_t>{5, 1, 3}, std::vector<std::int64_t>{4, 0, 2}}) {
    std::vector<double> shard_x;
    for (auto t : shard) {
      auto const r = row(x, t);
      shard_x.insert(shard_x.end(), r.begin(), r.end());
    }
    apply_input_jitter<double>(test::Exec{}, key, shard_x, shard, hidden, 0.1,
                               shard_x);  // in place
    for (std::size_t i = 0; i < shard.size(); ++i)
      CHECK(row(shard_x, static_cast<std::int64_t>(i)) == row(whole, shard[i]));
  }
}

TEST_CASE("the jitter's gradient is the jitter of the output gradient") {
  // L(x) = Σ w ⊙ jitter(x), so dL/dx = jitter(w): checked by central differences.
  JitterKey const key{.seed = 12, .step = 1, .layer_key = 0};
  std::int64_t const hidden = 3;
  std::vector<std::int64_t> const ids = {7, 8};
  auto x = normal_logits(2, hidden, 1.0, "router_options.x");
  auto const w = normal_logits(2, hidden, 1.0, "router_options.w");
  std::vector<double> out(x.size()), grad(x.size()), numeric(x.size());
  auto const loss = [&] {
    apply_input_jitter<double>(test::Exec{}, key, x, ids, hidden, 0.3, out);
    return std::inner_product(w.begin(), w.end(), out.begin(), 0.0);
  };
  apply_input_jitter<double>(test::Exec{}, key, w, ids, hidden, 0.3, grad);
  for (std::size_t i = 0; i < x.size(); ++i) numeric[i] = test::central_difference(x[i], loss);
  CHECK(test::relative_error(numeric, grad) < 1e-6);
}

TEST_CASE("apply_input_jitter rejects a wrong shape, a negative eps or token id, naming them") {
  JitterKey const key{};
  std::vector<double> x(12), out(12), short_buffer(10);
  std::vector<std::int64_t> const ids = {0, 1, 2};
  CHECK_THAT(error_of([&] {
               apply_input_jitter<double>(test::Exec{}, key, short_buffer, ids, 4, 0.1, out);
             }),
             Contains("x holds 10 values, but 3 tokens × hidden 4 need 12"));
  CHECK_THAT(error_of([&] {
               apply_input_jitter<double>(test::Exec{}, key, x, ids, 4, 0.1, short_buffer);
             }),
             Contains("out holds 10 values, but 3 tokens × hidden 4 need 12"));
  CHECK_THAT(error_of([&] { apply_input_jitter<double>(test::Exec{}, key, x, ids, 0, 0.1, out); }),
             Contains("hidden size 0 must be at least 1"));
  CHECK_THAT(error_of([&] { apply_input_jitter<double>(test::Exec{}, key, x, ids, 4, -0.5, out); }),
             Contains("eps -0.5 must be ≥ 0"));
  std::vector<std::int64_t> const bad_ids = {0, -7, 2};
  CHECK_THAT(
      error_of([&] { apply_input_jitter<double>(test::Exec{}, key, x, bad_ids, 4, 0.1, out); }),
      Contains("token id -7 at row 1 is negative"));
}
