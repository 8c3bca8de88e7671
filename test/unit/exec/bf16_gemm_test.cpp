// The BF16 GEMM (exec/blas.hpp): bf16 operands, FP32 accumulation, C in float or rounded once to
// bf16, against a naive double loop over the same bf16 inputs — every transpose combination,
// leading dimensions larger than the rows, alpha/beta, blocks smaller than the matrices (the
// sgemm-on-widened-blocks path) and the dispatching entry (sbgemm where the BLAS exports it).

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "moefold/core/precision.hpp"
#include "moefold/exec/cpu.hpp"
#include "support/catch.hpp"

using namespace moefold;

namespace {
struct Case {
  Trans ta, tb;
  std::int64_t m, n, k, lda, ldb, ldc;
  std::vector<bf16> a, b;
};

Case make_case(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k,
               std::uint32_t seed) {
  Case c{ta, tb, m, n, k, (ta == Trans::no ? k : m) + 2, (tb == Trans::no ? n : k) + 1, n + 3,
         {}, {}};
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  c.a.resize(static_cast<std::size_t>((ta == Trans::no ? m : k) * c.lda));
  c.b.resize(static_cast<std::size_t>((tb == Trans::no ? k : n) * c.ldb));
  for (auto& x : c.a) x = bf16(d(gen));
  for (auto& x : c.b) x = bf16(d(gen));
  return c;
}

// Exact (double) alpha·op(A)·op(B) + beta·C0 of the bf16 inputs, and Σ|alpha·a·b| + |beta·C0|
// for the error bound.
void reference(Case const& c, double alpha, double beta, std::vector<double> const& c0,
               std::vector<double>& out, std::vector<double>& mag) {
  out.assign(c0.size(), 0.0);
  mag.assign(c0.size(), 0.0);
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.n; ++j) {
      double acc = 0, abs = 0;
      for (std::int64_t p = 0; p < c.k; ++p) {
        auto const x = static_cast<double>(static_cast<float>(
            c.ta == Trans::no ? c.a[static_cast<std::size_t>(i * c.lda + p)]
                              : c.a[static_cast<std::size_t>(p * c.lda + i)]));
        auto const y = static_cast<double>(static_cast<float>(
            c.tb == Trans::no ? c.b[static_cast<std::size_t>(p * c.ldb + j)]
                              : c.b[static_cast<std::size_t>(j * c.ldb + p)]));
        acc += x * y;
        abs += std::abs(x * y);
      }
      auto const o = static_cast<std::size_t>(i * c.ldc + j);
      out[o] = alpha * acc + beta * c0[o];
      mag[o] = std::abs(alpha) * abs + std::abs(beta * c0[o]);
    }
}

// Runs one case with C of type TC (block 0: the dispatching gemm) and checks every element:
// FP32 accumulation error ≤ 1e-5·magnitude, plus one bf16 rounding (2⁻⁸ relative) for a bf16 C.
template <class TC>
void check(Case const& c, float alpha, float beta, std::int64_t block) {
  std::vector<TC> out(static_cast<std::size_t>(c.m * c.ldc));
  std::vector<double> c0(out.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = narrow<TC>(0.25f * static_cast<float>(i % 7) - 0.5f);
    c0[i] = static_cast<double>(static_cast<float>(out[i]));
  }
  if (block > 0)
    detail::gemm_bf16_blocked<TC>(c.ta, c.tb, c.m, c.n, c.k, alpha, c.a.data(), c.lda, c.b.data(),
                                  c.ldb, beta, out.data(), c.ldc, block);
  else
    gemm<TC>(c.ta, c.tb, c.m, c.n, c.k, alpha, c.a.data(), c.lda, c.b.data(), c.ldb, beta,
             out.data(), c.ldc);
  std::vector<double> ref, mag;
  reference(c, alpha, beta, c0, ref, mag);
  double const round = std::is_same_v<TC, bf16> ? std::ldexp(1.0, -8) : 0.0;
  for (std::int64_t i = 0; i < c.m; ++i)
    for (std::int64_t j = 0; j < c.ldc; ++j) {
      auto const o = static_cast<std::size_t>(i * c.ldc + j);
      auto const got = static_cast<double>(static_cast<float>(out[o]));
      if (j >= c.n) {  // beyond n: untouched
        REQUIRE(got == c0[o]);
        continue;
      }
      INFO("C(" << i << "," << j << ") ta " << (c.ta == Trans::yes) << " tb "
                << (c.tb == Trans::yes) << " block " << block);
      REQUIRE(std::abs(got - ref[o]) <= 1e-5 * mag[o] + round * std::abs(ref[o]) + 1e-30);
    }
}
}  // namespace

TEMPLATE_TEST_CASE("bf16 gemm accumulates in FP32 and equals the double loop", "[blas][bf16]",
                   float, bf16) {
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes}) {
      auto const c = make_case(ta, tb, 13, 11, 37, 7u);
      for (std::int64_t block : {0, 4, 5, 256}) {
        check<TestType>(c, 1.0f, 0.0f, block);
        check<TestType>(c, -0.75f, 1.5f, block);
      }
    }
  // k = 0 scales C by beta; m or n = 0 leaves it alone.
  check<TestType>(make_case(Trans::no, Trans::no, 3, 4, 0, 1u), 1.0f, 0.5f, 0);
  check<TestType>(make_case(Trans::yes, Trans::no, 0, 4, 3, 1u), 1.0f, 0.5f, 0);
}

TEST_CASE("bf16 gemm sums 1000 products exactly where bf16 sums would stall at 256", "[blas][bf16]") {
  std::int64_t const k = 1000;
  std::vector<bf16> ones(static_cast<std::size_t>(k), bf16(1.0f));
  for (std::int64_t block : {0, 64}) {
    float c = 0;
    bf16 cb{};
    if (block > 0) {
      detail::gemm_bf16_blocked<float>(Trans::no, Trans::no, 1, 1, k, 1.0f, ones.data(), k,
                                       ones.data(), 1, 0.0f, &c, 1, block);
      detail::gemm_bf16_blocked<bf16>(Trans::no, Trans::no, 1, 1, k, 1.0f, ones.data(), k,
                                      ones.data(), 1, 0.0f, &cb, 1, block);
    } else {
      gemm<float>(Trans::no, Trans::no, 1, 1, k, 1.0f, ones.data(), k, ones.data(), 1, 0.0f, &c, 1);
      gemm<bf16>(Trans::no, Trans::no, 1, 1, k, 1.0f, ones.data(), k, ones.data(), 1, 0.0f, &cb, 1);
    }
    CHECK(c == 1000.0f);
    CHECK(static_cast<float>(cb) == 1000.0f);
  }
}

TEST_CASE("bf16 gemm on views: float main gradient or bf16 output, shapes checked", "[blas][bf16]") {
  Cpu exec;
  auto const c = make_case(Trans::yes, Trans::no, 4, 6, 9, 3u);  // dW = dYᵀ·X: A stored k×m
  View<bf16 const> a(c.a.data(), 9, 4, c.lda);
  View<bf16 const> b(c.b.data(), 9, 6, c.ldb);
  Buffer<float> g(24);
  Buffer<bf16> y(24);
  gemm<bf16>(exec, Trans::yes, Trans::no, 1, a, b, 0, g.view(4, 6));
  gemm<bf16>(exec, Trans::yes, Trans::no, 1, a, b, 1, g.view(4, 6));  // accumulates
  gemm<bf16>(exec, Trans::yes, Trans::no, 2, a, b, 0, y.view(4, 6));
  for (std::int64_t i = 0; i < 24; ++i) CHECK(static_cast<float>(y[i]) == static_cast<float>(bf16(g[i])));
  CHECK_THROWS_WITH(gemm<bf16>(exec, Trans::no, Trans::no, 1, a, b, 0, g.view(4, 6)),
                    Catch::Contains("op(A) has 9 rows, C has 4"));
}
