#pragma once
/// \file
/// Row-major GEMM through CBLAS (OpenBLAS where available), the CPU GEMM of every moefold
/// layer. BLAS runs one thread per calling thread by default: in the in-process world N rank
/// threads already share the cores (set MOEFOLD_BLAS_THREADS to change it).

#include <cblas.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <type_traits>
#include <mutex>
#include <string_view>

#include "moefold/core/error.hpp"

#if __has_include(<openblas_config.h>)
#define MOEFOLD_DETAIL_OPENBLAS 1
#else
#define MOEFOLD_DETAIL_OPENBLAS 0
#endif

namespace moefold {
inline namespace v0 {

/// Whether a GEMM operand is used as stored or transposed.
enum class Trans : std::uint8_t { no, yes };

namespace detail {
/// Sets the BLAS thread count once per process: MOEFOLD_BLAS_THREADS, or 1.
inline void init_blas_threads() {
  static std::once_flag once;
  std::call_once(once, [] {
#if MOEFOLD_DETAIL_OPENBLAS
    int threads = 1;
    if (char const* env = std::getenv("MOEFOLD_BLAS_THREADS")) threads = std::max(1, std::atoi(env));
    openblas_set_num_threads(threads);
#endif
  });
}
}  // namespace detail

/// C[m×n] = alpha · op(A) · op(B) + beta · C, all row-major: op(A) is m×k (A stored k×m when
/// transposed), op(B) is k×n; lda, ldb, ldc are the row strides. float or double.
template <class T>
void gemm(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, T const* a,
          std::int64_t lda, T const* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "moefold::gemm supports float and double");
  MOEFOLD_EXPECTS(m >= 0 && n >= 0 && k >= 0, "gemm: negative size m={} n={} k={}", m, n, k);
  if (m == 0 || n == 0) return;
  MOEFOLD_EXPECTS(ldc >= n, "gemm: ldc {} < n {}", ldc, n);
  MOEFOLD_EXPECTS(lda >= (ta == Trans::no ? k : m) || k == 0, "gemm: lda {} too small", lda);
  MOEFOLD_EXPECTS(ldb >= (tb == Trans::no ? n : k) || k == 0, "gemm: ldb {} too small", ldb);
  detail::init_blas_threads();
  auto const cta = ta == Trans::no ? CblasNoTrans : CblasTrans;
  auto const ctb = tb == Trans::no ? CblasNoTrans : CblasTrans;
  // CBLAS wants ld ≥ 1 even for empty operands.
  auto const la = static_cast<int>(std::max<std::int64_t>(lda, 1));
  auto const lb = static_cast<int>(std::max<std::int64_t>(ldb, 1));
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, cta, ctb, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, a, la, b, lb, beta, c, static_cast<int>(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, cta, ctb, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, a, la, b, lb, beta, c, static_cast<int>(ldc));
  }
}

}  // namespace v0
}  // namespace moefold
