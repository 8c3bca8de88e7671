// gemm: every transpose combination against a direct triple loop, with leading dimensions
// larger than the rows, alpha/beta, and empty shapes.

#include <cstdint>
#include <vector>

#include "moefold/exec/blas.hpp"
#include "support/catch.hpp"

using namespace moefold;

namespace {
template <class T>
void reference(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
               std::vector<T> const& a, std::int64_t lda, std::vector<T> const& b, std::int64_t ldb,
               T beta, std::vector<T>& c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      T acc = 0;
      for (std::int64_t p = 0; p < k; ++p) {
        T const x = ta == Trans::no ? a[static_cast<std::size_t>(i * lda + p)] : a[static_cast<std::size_t>(p * lda + i)];
        T const y = tb == Trans::no ? b[static_cast<std::size_t>(p * ldb + j)] : b[static_cast<std::size_t>(j * ldb + p)];
        acc += x * y;
      }
      auto& out = c[static_cast<std::size_t>(i * ldc + j)];
      out = alpha * acc + beta * out;
    }
}
}  // namespace

TEMPLATE_TEST_CASE("gemm equals the triple loop for every transpose combination", "[blas]", float,
                   double) {
  std::int64_t const m = 5, n = 7, k = 3;
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes}) {
      std::int64_t const lda = (ta == Trans::no ? k : m) + 2;
      std::int64_t const ldb = (tb == Trans::no ? n : k) + 1;
      std::int64_t const ldc = n + 3;
      std::vector<TestType> a(static_cast<std::size_t>((ta == Trans::no ? m : k) * lda));
      std::vector<TestType> b(static_cast<std::size_t>((tb == Trans::no ? k : n) * ldb));
      std::vector<TestType> c(static_cast<std::size_t>(m * ldc));
      for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<TestType>((i * 7) % 11) - 5;
      for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<TestType>((i * 5) % 13) - 6;
      for (std::size_t i = 0; i < c.size(); ++i) c[i] = static_cast<TestType>(i % 3);
      auto expected = c;
      reference<TestType>(ta, tb, m, n, k, 2, a, lda, b, ldb, 0.5, expected, ldc);
      gemm<TestType>(ta, tb, m, n, k, 2, a.data(), lda, b.data(), ldb, 0.5, c.data(), ldc);
      CHECK(c == expected);  // small integers: exact
    }
}

TEST_CASE("gemm with an empty inner dimension scales C by beta, empty m or n does nothing") {
  std::vector<double> c{1, 2, 3, 4};
  gemm<double>(Trans::no, Trans::no, 2, 2, 0, 1.0, nullptr, 0, nullptr, 2, 3.0, c.data(), 2);
  CHECK(c == std::vector<double>{3, 6, 9, 12});
  gemm<double>(Trans::no, Trans::no, 0, 2, 4, 1.0, nullptr, 4, nullptr, 2, 0.0, c.data(), 2);
  CHECK(c == std::vector<double>{3, 6, 9, 12});
}

TEST_CASE("gemm rejects inconsistent leading dimensions") {
  std::vector<float> a(6), b(6), c(4);
  CHECK_THROWS_AS(gemm<float>(Trans::no, Trans::no, 2, 2, 3, 1.f, a.data(), 2, b.data(), 2, 0.f,
                              c.data(), 2),
                  error);
}
