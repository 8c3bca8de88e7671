// GroupedGemmExperts: the grouped GEMMs equal a direct per-expert computation; ETP shards sum
// to the unsharded experts; gradients agree with finite differences; experts without tokens
// and bad shapes are handled.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moefold/moe/grouped_gemm_experts.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"
#include "support/finite_difference.hpp"

using namespace moefold;
using Catch::Matchers::Contains;

namespace {

constexpr std::int64_t kH = 6, kF = 4;

template <class T>
std::vector<T> values(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::vector<T> v(n);
  init_rows(std::span<T>(v), seed, "test.values", 1, 0, InitDist::uniform, scale);
  return v;
}

ExpertsConfig config(int etp_size, int etp_rank) {
  return {.num_local_experts = 3, .first_expert = 3, .hidden_size = kH, .ffn_hidden_size = kF,
          .etp_size = etp_size, .etp_rank = etp_rank, .name_prefix = "layer.experts",
          .init_std = 0.5};
}

/// Direct computation of expert l's output row for input row x and probability p, from the
/// experts' own (unsharded) weights.
template <class Act, class E>
std::vector<double> direct(E& experts, int l, double const* x, double p) {
  std::int64_t const g = Act::kGates * kF;
  std::vector<double> h1(static_cast<std::size_t>(g)), a(static_cast<std::size_t>(kF)),
      y(static_cast<std::size_t>(kH), 0.0);
  auto const& w1 = experts.fc1(l).value;
  auto const& w2 = experts.fc2(l).value;
  for (std::int64_t o = 0; o < g; ++o)
    for (std::int64_t i = 0; i < kH; ++i) h1[static_cast<std::size_t>(o)] += w1[static_cast<std::size_t>(o * kH + i)] * x[i];
  for (std::int64_t j = 0; j < kF; ++j) Act::forward(h1.data(), kF, j, a.data());
  for (std::int64_t o = 0; o < kH; ++o)
    for (std::int64_t j = 0; j < kF; ++j)
      y[static_cast<std::size_t>(o)] += w2[static_cast<std::size_t>(o * kF + j)] * a[static_cast<std::size_t>(j)] * p;
  return y;
}

double rel_err(std::vector<double> const& a, std::vector<double> const& b) {
  return test::relative_error(a, b);
}

}  // namespace

TEMPLATE_TEST_CASE("grouped experts equal a direct per-expert computation, empty experts too",
                   "[experts]", SwiGLU, GeLU) {
  GroupedGemmExperts<test::Exec, TestType, BlasGroupedGemm, double> experts(config(1, 0), 11);
  std::vector<std::int64_t> const counts{2, 0, 3};  // the middle expert gets no tokens
  auto const x = values<double>(5 * kH, 1);
  auto const p = values<double>(5, 2);
  auto const y = experts.forward(x, p, counts);
  int row = 0;
  for (int l = 0; l < 3; ++l)
    for (std::int64_t k = 0; k < counts[static_cast<std::size_t>(l)]; ++k, ++row) {
      auto const expected = direct<TestType>(experts, l, x.data() + row * kH, p[static_cast<std::size_t>(row)]);
      std::vector<double> got(y.begin() + row * kH, y.begin() + (row + 1) * kH);
      CHECK(rel_err(got, expected) < 1e-14);
    }
  // No rows at all is fine too.
  std::vector<std::int64_t> const none{0, 0, 0};
  CHECK(experts.forward({}, {}, none).empty());
  CHECK(experts.backward({}).input.empty());
}

TEMPLATE_TEST_CASE("ETP shards of the experts sum to the unsharded experts, gradients included",
                   "[experts]", SwiGLU, GeLU) {
  using Experts = GroupedGemmExperts<test::Exec, TestType, BlasGroupedGemm, double>;
  std::vector<std::int64_t> const counts{1, 3, 2};
  auto const x = values<double>(6 * kH, 3);
  auto const p = values<double>(6, 4);
  auto const dy = values<double>(6 * kH, 5);
  Experts full(config(1, 0), 21);
  auto const y = full.forward(x, p, counts);
  auto const g = full.backward(dy);
  std::vector<double> y_sum(y.size()), dx_sum(g.input.size()), dp_sum(g.probs.size());
  for (int r = 0; r < 2; ++r) {
    Experts shard(config(2, r), 21);
    auto const ys = shard.forward(x, p, counts);
    auto const gs = shard.backward(dy);
    for (std::size_t i = 0; i < y.size(); ++i) y_sum[i] += ys[i];
    for (std::size_t i = 0; i < dx_sum.size(); ++i) dx_sum[i] += gs.input[i];
    for (std::size_t i = 0; i < dp_sum.size(); ++i) dp_sum[i] += gs.probs[i];
    // The shard's weights and weight gradients are its slices of the unsharded ones.
    for (int l = 0; l < 3; ++l) {
      for (auto [mine, whole] : {std::pair{&shard.fc1(l), &full.fc1(l)}, std::pair{&shard.fc2(l), &full.fc2(l)}}) {
        CHECK(mine->value == mine->local_of(std::span<double const>(whole->value)));
        CHECK(rel_err(mine->grad.vector(), mine->local_of(std::span<double const>(whole->grad))) < 1e-13);
      }
    }
  }
  CHECK(rel_err(y_sum, y) < 1e-13);
  CHECK(rel_err(dx_sum, g.input) < 1e-13);
  CHECK(rel_err(dp_sum, g.probs) < 1e-13);
}

TEMPLATE_TEST_CASE("expert gradients agree with central finite differences", "[experts]", SwiGLU,
                   GeLU) {
  using Experts = GroupedGemmExperts<test::Exec, TestType, BlasGroupedGemm, double>;
  std::vector<std::int64_t> const counts{2, 1, 2};
  auto x = values<double>(5 * kH, 6);
  auto p = values<double>(5, 7);
  auto const r = values<double>(5 * kH, 8);  // loss = Σ y ⊙ r
  Experts experts(config(1, 0), 31);
  auto loss = [&] {
    auto const y = experts.forward(x, p, counts);
    double s = 0;
    for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * r[i];
    return s;
  };
  (void)experts.forward(x, p, counts);
  auto const g = experts.backward(r);
  auto fd = [&](double& v) { return test::central_difference(v, loss); };
  std::vector<double> analytic, numeric;
  for (std::size_t i = 0; i < x.size(); i += 3) {
    analytic.push_back(g.input[i]);
    numeric.push_back(fd(x[i]));
  }
  for (std::size_t i = 0; i < p.size(); ++i) {
    analytic.push_back(g.probs[i]);
    numeric.push_back(fd(p[i]));
  }
  for (int l = 0; l < 3; ++l)
    for (auto* param : {&experts.fc1(l), &experts.fc2(l)})
      for (std::size_t i = 0; i < param->size(); i += 5) {
        analytic.push_back(param->grad[i]);
        numeric.push_back(fd(param->value[i]));
      }
  CHECK(rel_err(analytic, numeric) < 1e-6);
}

TEST_CASE("bad expert configurations and inputs are rejected with the numbers") {
  auto c = config(3, 0);  // F = 4 is not divisible by ETP = 3
  CHECK_THROWS_WITH((GroupedGemmExperts<test::Exec, SwiGLU>(c, 1)),
                    Contains("moe_ffn_hidden_size (4) is not divisible by "
                             "expert_tensor_parallel_size (3)"));
  GroupedGemmExperts<test::Exec, SwiGLU> experts(config(1, 0), 1);
  std::vector<float> x(2 * kH), p(2);
  std::vector<std::int64_t> wrong{1, 1};
  CHECK_THROWS_WITH(experts.forward(x, p, wrong), Contains("tokens_per_expert has 2 entries for 3 local experts"));
  std::vector<std::int64_t> counts{1, 0, 2};
  CHECK_THROWS_WITH(experts.forward(x, p, counts), Contains("input has 12 elements, expected 3 rows × 6"));
}
