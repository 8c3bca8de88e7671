#pragma once
/// \file
/// Row-major GEMM through CBLAS (OpenBLAS where available), the CPU GEMM of every moefold
/// layer. BF16 operands accumulate in FP32 (Megatron's `--bf16`): through `cblas_sbgemm` where
/// the BLAS exports it (MOEFOLD_HAVE_SBGEMM), otherwise by converting bounded blocks of A and B
/// to float and calling `sgemm` (Debian 12's OpenBLAS exports no sbgemm). BLAS runs one thread per calling thread by default: in the in-process world N rank
/// threads already share the cores (set MOEFOLD_BLAS_THREADS to change it).

#include <cblas.h>

#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <type_traits>
#include <mutex>
#include <string_view>
#include <vector>

#include "moefold/config.hpp"
#include "moefold/core/bf16.hpp"
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
/// Checks the sizes and strides of a row-major GEMM.
inline void check_gemm(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k,
                       std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
  MOEFOLD_EXPECTS(m >= 0 && n >= 0 && k >= 0, "gemm: negative size m={} n={} k={}", m, n, k);
  if (m == 0 || n == 0) return;
  MOEFOLD_EXPECTS(ldc >= n, "gemm: ldc {} < n {}", ldc, n);
  MOEFOLD_EXPECTS(lda >= (ta == Trans::no ? k : m) || k == 0, "gemm: lda {} too small", lda);
  MOEFOLD_EXPECTS(ldb >= (tb == Trans::no ? n : k) || k == 0, "gemm: ldb {} too small", ldb);
}

}  // namespace detail

/// C[m×n] = alpha · op(A) · op(B) + beta · C, all row-major: op(A) is m×k (A stored k×m when
/// transposed), op(B) is k×n; lda, ldb, ldc are the row strides. float or double.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double>)
void gemm(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, T const* a,
          std::int64_t lda, T const* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  detail::check_gemm(ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
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

namespace detail {
/// Widens the stored rows [r0, r0+rows) × cols [c0, c0+cols) of a bf16 matrix into `out`
/// (row-major, ld = cols).
inline void widen_block(bf16 const* src, std::int64_t ld, std::int64_t r0, std::int64_t rows,
                        std::int64_t c0, std::int64_t cols, float* out) {
  for (std::int64_t r = 0; r < rows; ++r) {
    bf16 const* s = src + (r0 + r) * ld + c0;
    float* o = out + r * cols;
    for (std::int64_t c = 0; c < cols; ++c) o[c] = static_cast<float>(s[c]);
  }
}

/// C = alpha·op(A)·op(B) + beta·C for bf16 A, B by FP32 `sgemm` on blocks of at most
/// `block` rows of C, `block` columns of C and `block` of k, widened to float in thread-local
/// scratch (≤ 3·block² floats). Each C element accumulates all of k in FP32 (a bf16 C is kept in
/// an FP32 block and rounded once).
template <class TC>
void gemm_bf16_blocked(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k,
                       float alpha, bf16 const* a, std::int64_t lda, bf16 const* b,
                       std::int64_t ldb, float beta, TC* c, std::int64_t ldc,
                       std::int64_t block = 256) {
  static_assert(std::is_same_v<TC, float> || std::is_same_v<TC, bf16>);
  MOEFOLD_EXPECTS(block > 0, "gemm: block size {} must be positive", block);
  thread_local std::vector<float> sa, sb, sc;
  sa.resize(static_cast<std::size_t>(block * block));
  sb.resize(sa.size());
  if constexpr (std::is_same_v<TC, bf16>) sc.resize(sa.size());
  auto const cta = ta == Trans::no ? CblasNoTrans : CblasTrans;
  auto const ctb = tb == Trans::no ? CblasNoTrans : CblasTrans;
  for (std::int64_t i0 = 0; i0 < m; i0 += block) {
    std::int64_t const mb = std::min(block, m - i0);
    for (std::int64_t j0 = 0; j0 < n; j0 += block) {
      std::int64_t const nb = std::min(block, n - j0);
      float* cb;  // the FP32 C block
      std::int64_t ldcb;
      if constexpr (std::is_same_v<TC, float>) {
        cb = c + i0 * ldc + j0;
        ldcb = ldc;
        if (beta != 1.0f)
          for (std::int64_t i = 0; i < mb; ++i)
            for (std::int64_t j = 0; j < nb; ++j)
              cb[i * ldc + j] = beta == 0.0f ? 0.0f : beta * cb[i * ldc + j];
      } else {
        cb = sc.data();
        ldcb = nb;
        for (std::int64_t i = 0; i < mb; ++i)
          for (std::int64_t j = 0; j < nb; ++j)
            cb[i * nb + j] =
                beta == 0.0f ? 0.0f : beta * static_cast<float>(c[(i0 + i) * ldc + j0 + j]);
      }
      for (std::int64_t p0 = 0; p0 < k; p0 += block) {
        std::int64_t const kb = std::min(block, k - p0);
        // The stored block of A holding op(A)[i0:i0+mb, p0:p0+kb], and of B for op(B)[p0:, j0:].
        if (ta == Trans::no) widen_block(a, lda, i0, mb, p0, kb, sa.data());
        else widen_block(a, lda, p0, kb, i0, mb, sa.data());
        if (tb == Trans::no) widen_block(b, ldb, p0, kb, j0, nb, sb.data());
        else widen_block(b, ldb, j0, nb, p0, kb, sb.data());
        cblas_sgemm(CblasRowMajor, cta, ctb, static_cast<int>(mb), static_cast<int>(nb),
                    static_cast<int>(kb), alpha, sa.data(),
                    static_cast<int>(ta == Trans::no ? kb : mb), sb.data(),
                    static_cast<int>(tb == Trans::no ? nb : kb), 1.0f, cb,
                    static_cast<int>(ldcb));
      }
      if constexpr (std::is_same_v<TC, bf16>)
        for (std::int64_t i = 0; i < mb; ++i)
          for (std::int64_t j = 0; j < nb; ++j)
            c[(i0 + i) * ldc + j0 + j] = bf16(cb[i * nb + j]);
    }
  }
}
}  // namespace detail

/// Whether bf16 GEMMs go through the BLAS's own `cblas_sbgemm` (else: blocks widened to float).
inline constexpr bool have_sbgemm = MOEFOLD_HAVE_SBGEMM != 0;

/// C[m×n] = alpha · op(A) · op(B) + beta · C with bf16 A and B, accumulated in FP32; C is float
/// (a main gradient, logits for the loss) or bf16 (rounded once). Row-major as above.
template <class TC>
  requires(std::is_same_v<TC, float> || std::is_same_v<TC, bf16>)
void gemm(Trans ta, Trans tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          bf16 const* a, std::int64_t lda, bf16 const* b, std::int64_t ldb, float beta, TC* c,
          std::int64_t ldc) {
  detail::check_gemm(ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  detail::init_blas_threads();
#if MOEFOLD_HAVE_SBGEMM
  if constexpr (std::is_same_v<TC, float>) {
    static_assert(sizeof(bfloat16) == sizeof(bf16));
    cblas_sbgemm(CblasRowMajor, ta == Trans::no ? CblasNoTrans : CblasTrans,
                 tb == Trans::no ? CblasNoTrans : CblasTrans, static_cast<int>(m),
                 static_cast<int>(n), static_cast<int>(k), alpha,
                 reinterpret_cast<bfloat16 const*>(a), static_cast<int>(std::max<std::int64_t>(lda, 1)),
                 reinterpret_cast<bfloat16 const*>(b), static_cast<int>(std::max<std::int64_t>(ldb, 1)),
                 beta, c, static_cast<int>(ldc));
    return;
  }
#endif
  detail::gemm_bf16_blocked<TC>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace v0
}  // namespace moefold
