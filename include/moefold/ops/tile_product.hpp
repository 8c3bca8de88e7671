#pragma once
/// \file
/// The small dense products of a tiled attention body (ops/flash_attention.hpp), in registers:
///
///   c[r·ldc + j] (+)= Σ_k a[r·ar + k·ak] · b[k·ldb + j]    r < M, j < N, k = 0, 1, … in order
///
/// `a` is read one element at a time (any strides: a row-major tile or a transposed one), `b`
/// and `c` by rows of N contiguous elements. Three kernels, one chosen per process:
///
///   TileKernel::portable  2 rows × 4 vectors of 16 bytes (GCC vector extensions, no FMA) on host
///                         compilers; a scalar loop under nvcc and other compilers
///   TileKernel::avx2      4 rows × 2 vectors of 32 bytes, AVX2 + FMA (x86-64 host compilers)
///   TileKernel::avx512    8 rows × 2 vectors of 64 bytes, AVX-512F + FMA (x86-64 host compilers)
///
/// `best_tile_kernel()` picks the widest the processor runs (`__builtin_cpu_supports`, once per
/// process), so results are deterministic on a machine; the kernels differ only by rounding
/// (fused multiply-adds, the same order of k). Every element's sum runs in the same order in a
/// full register block and in a tail, so a body's results do not depend on where its tile lies.
///
///   ops::tile_product(ops::best_tile_kernel(), /*add=*/true, c, ldc, a, ar, ak, b, ldb, M, N, K);

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moefold/core/hd.hpp"

#if defined(__GNUC__) && !defined(__CUDACC__) && defined(__x86_64__)
#define MOEFOLD_TILE_X86 1
#include <immintrin.h>
#endif

namespace moefold {
inline namespace v0 {
namespace ops {

/// Which register kernel a tile product runs.
enum class TileKernel : unsigned char { portable, avx2, avx512 };

/// The kernel's name, as the tests and benchmarks print it.
inline char const* to_string(TileKernel k) noexcept {
  return k == TileKernel::avx512 ? "avx512" : k == TileKernel::avx2 ? "avx2" : "portable";
}

/// Whether this build and processor can run `k` (portable: always).
inline bool tile_kernel_available(TileKernel k) noexcept {
#if defined(MOEFOLD_TILE_X86)
  if (k == TileKernel::avx512) return __builtin_cpu_supports("avx512f");
  if (k == TileKernel::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return k == TileKernel::portable;
}

/// The widest kernel this process runs, decided once.
inline TileKernel best_tile_kernel() noexcept {
  static TileKernel const k = tile_kernel_available(TileKernel::avx512) ? TileKernel::avx512
                              : tile_kernel_available(TileKernel::avx2) ? TileKernel::avx2
                                                                        : TileKernel::portable;
  return k;
}

namespace detail {

/// The scalar loop over rows [r0, r1), columns [j0, j1).
template <class C>
MOEFOLD_HD void tile_product_scalar(bool add, C* MOEFOLD_RESTRICT c, std::int64_t ldc,
                                    C const* MOEFOLD_RESTRICT a, std::int64_t ar, std::int64_t ak,
                                    C const* MOEFOLD_RESTRICT b, std::int64_t ldb, std::int64_t r0,
                                    std::int64_t r1, std::int64_t j0, std::int64_t j1,
                                    std::int64_t K) {
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t j = j0; j < j1; ++j) {
      C acc = add ? c[r * ldc + j] : C{0};
      for (std::int64_t k = 0; k < K; ++k) acc += a[r * ar + k * ak] * b[k * ldb + j];
      c[r * ldc + j] = acc;
    }
}

#if defined(__GNUC__) && !defined(__CUDACC__)
/// The portable block: rows r, r + 1 × 4 vectors of 16 bytes from column j0 (no FMA).
template <class C>
inline void tile_block_portable(bool add, C* c, std::int64_t ldc, C const* a, std::int64_t ar,
                                std::int64_t ak, C const* b, std::int64_t ldb, std::int64_t r,
                                std::int64_t j0, std::int64_t K) {
  typedef C V __attribute__((vector_size(16)));
  constexpr std::int64_t n = 16 / sizeof(C);
  C* const c0 = c + r * ldc + j0;
  C* const c1 = c0 + ldc;
  V x[4], y[4];
  for (int u = 0; u < 4; ++u) {
    x[u] = V{};
    y[u] = V{};
    if (add) {
      __builtin_memcpy(&x[u], c0 + u * n, sizeof(V));
      __builtin_memcpy(&y[u], c1 + u * n, sizeof(V));
    }
  }
  for (std::int64_t k = 0; k < K; ++k) {
    C const* bk = b + k * ldb + j0;
    V const s = V{} + a[r * ar + k * ak], t = V{} + a[(r + 1) * ar + k * ak];
    for (int u = 0; u < 4; ++u) {
      V bv;
      __builtin_memcpy(&bv, bk + u * n, sizeof(V));
      x[u] += s * bv;
      y[u] += t * bv;
    }
  }
  for (int u = 0; u < 4; ++u) {
    __builtin_memcpy(c0 + u * n, &x[u], sizeof(V));
    __builtin_memcpy(c1 + u * n, &y[u], sizeof(V));
  }
}
#endif

#if defined(MOEFOLD_TILE_X86)
#define MOEFOLD_TARGET_AVX512 __attribute__((target("avx512f,fma"), always_inline))
#define MOEFOLD_TARGET_AVX2 __attribute__((target("avx2,fma"), always_inline))

/// Vector operations of one kernel: `V` of `n` elements of C, masked loads and stores of the
/// first `count` elements (nothing is touched past them).
template <class C>
struct Avx512;
template <>
struct Avx512<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int n = 16;
  MOEFOLD_TARGET_AVX512 static __mmask16 mask(std::int64_t count) {
    return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (count > 0 ? count : 0)) - 1);
  }
  MOEFOLD_TARGET_AVX512 static V load(float const* p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
  MOEFOLD_TARGET_AVX512 static void store(float* p, V v, __mmask16 m) {
    _mm512_mask_storeu_ps(p, m, v);
  }
  MOEFOLD_TARGET_AVX512 static V zero() { return _mm512_setzero_ps(); }
  MOEFOLD_TARGET_AVX512 static V splat(float x) { return _mm512_set1_ps(x); }
  MOEFOLD_TARGET_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
template <>
struct Avx512<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int n = 8;
  MOEFOLD_TARGET_AVX512 static __mmask8 mask(std::int64_t count) {
    return count >= 8 ? __mmask8(0xFF) : __mmask8((1u << (count > 0 ? count : 0)) - 1);
  }
  MOEFOLD_TARGET_AVX512 static V load(double const* p, __mmask8 m) {
    return _mm512_maskz_loadu_pd(m, p);
  }
  MOEFOLD_TARGET_AVX512 static void store(double* p, V v, __mmask8 m) {
    _mm512_mask_storeu_pd(p, m, v);
  }
  MOEFOLD_TARGET_AVX512 static V zero() { return _mm512_setzero_pd(); }
  MOEFOLD_TARGET_AVX512 static V splat(double x) { return _mm512_set1_pd(x); }
  MOEFOLD_TARGET_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
template <class C>
struct Avx2;
template <>
struct Avx2<float> {
  using V = __m256;
  static constexpr int n = 8;
  MOEFOLD_TARGET_AVX2 static __m256i mask(std::int64_t count) {
    int const k = count > 8 ? 8 : static_cast<int>(count);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  MOEFOLD_TARGET_AVX2 static V load(float const* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  MOEFOLD_TARGET_AVX2 static void store(float* p, V v, __m256i m) { _mm256_maskstore_ps(p, m, v); }
  MOEFOLD_TARGET_AVX2 static V zero() { return _mm256_setzero_ps(); }
  MOEFOLD_TARGET_AVX2 static V splat(float x) { return _mm256_set1_ps(x); }
  MOEFOLD_TARGET_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
template <>
struct Avx2<double> {
  using V = __m256d;
  static constexpr int n = 4;
  MOEFOLD_TARGET_AVX2 static __m256i mask(std::int64_t count) {
    long long const k = count > 4 ? 4 : count;
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(k), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  MOEFOLD_TARGET_AVX2 static V load(double const* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  MOEFOLD_TARGET_AVX2 static void store(double* p, V v, __m256i m) { _mm256_maskstore_pd(p, m, v); }
  MOEFOLD_TARGET_AVX2 static V zero() { return _mm256_setzero_pd(); }
  MOEFOLD_TARGET_AVX2 static V splat(double x) { return _mm256_set1_pd(x); }
  MOEFOLD_TARGET_AVX2 static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
#undef MOEFOLD_TARGET_AVX512
#undef MOEFOLD_TARGET_AVX2

/// One register block: rows [r0, r0 + R) × 2 vectors from column j0 (masks m0, m1 at the right
/// edge); per element c += a·b fused, k in order. Written once as a macro because each kernel
/// needs its own target attribute (a lambda or a template without it could not inline the
/// intrinsics).
#define MOEFOLD_TILE_BLOCK_BODY(Isa)                                                        \
  using V = typename Isa::V;                                                                \
  constexpr std::int64_t L = Isa::n;                                                        \
  V x[R], y[R];                                                                             \
  C* const cr = c + r0 * ldc + j0;                                                          \
  for (int i = 0; i < R; ++i) {                                                             \
    x[i] = add ? Isa::load(cr + i * ldc, m0) : Isa::zero();                                 \
    y[i] = add ? Isa::load(cr + i * ldc + L, m1) : Isa::zero();                             \
  }                                                                                         \
  for (std::int64_t k = 0; k < K; ++k) {                                                    \
    V const b0 = Isa::load(b + k * ldb + j0, m0), b1 = Isa::load(b + k * ldb + j0 + L, m1); \
    C const* ak0 = a + r0 * ar + k * ak;                                                    \
    for (int i = 0; i < R; ++i) {                                                           \
      V const s = Isa::splat(ak0[i * ar]);                                                  \
      x[i] = Isa::fma(s, b0, x[i]);                                                         \
      y[i] = Isa::fma(s, b1, y[i]);                                                         \
    }                                                                                       \
  }                                                                                         \
  for (int i = 0; i < R; ++i) {                                                             \
    Isa::store(cr + i * ldc, x[i], m0);                                                     \
    Isa::store(cr + i * ldc + L, y[i], m1);                                                 \
  }

/// The whole product: column blocks of 2 vectors, rows in blocks of MR, then one at a time.
#define MOEFOLD_TILE_PRODUCT_BODY(Isa, block, MR)                                     \
  constexpr std::int64_t L = Isa::n;                                                  \
  for (std::int64_t j0 = 0; j0 < N; j0 += 2 * L) {                                    \
    auto const m0 = Isa::mask(N - j0), m1 = Isa::mask(N - j0 - L);                    \
    std::int64_t r = 0;                                                               \
    for (; r + (MR) <= M; r += (MR))                                                  \
      block<C, (MR)>(add, c, ldc, a, ar, ak, b, ldb, K, r, j0, m0, m1);               \
    for (; r < M; ++r) block<C, 1>(add, c, ldc, a, ar, ak, b, ldb, K, r, j0, m0, m1); \
  }

#define MOEFOLD_TILE_BLOCK_ARGS                                                                    \
  bool add, C *MOEFOLD_RESTRICT c, std::int64_t ldc, C const *MOEFOLD_RESTRICT a, std::int64_t ar, \
      std::int64_t ak, C const *MOEFOLD_RESTRICT b, std::int64_t ldb, std::int64_t K,              \
      std::int64_t r0, std::int64_t j0
#define MOEFOLD_TILE_PRODUCT_ARGS                                                                  \
  bool add, C *MOEFOLD_RESTRICT c, std::int64_t ldc, C const *MOEFOLD_RESTRICT a, std::int64_t ar, \
      std::int64_t ak, C const *MOEFOLD_RESTRICT b, std::int64_t ldb, std::int64_t M,              \
      std::int64_t N, std::int64_t K

template <class C, int R>
__attribute__((target("avx512f,fma"), always_inline)) inline void tile_block_avx512(
    MOEFOLD_TILE_BLOCK_ARGS, typename Avx512<C>::Mask m0, typename Avx512<C>::Mask m1) {
  MOEFOLD_TILE_BLOCK_BODY(Avx512<C>)
}
template <class C, int R>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_block_avx2(
    MOEFOLD_TILE_BLOCK_ARGS, __m256i m0, __m256i m1) {
  MOEFOLD_TILE_BLOCK_BODY(Avx2<C>)
}
template <class C>
__attribute__((target("avx512f,fma"))) void tile_product_avx512(MOEFOLD_TILE_PRODUCT_ARGS) {
  MOEFOLD_TILE_PRODUCT_BODY(Avx512<C>, tile_block_avx512, 8)
}
template <class C>
__attribute__((target("avx2,fma"))) void tile_product_avx2(MOEFOLD_TILE_PRODUCT_ARGS) {
  MOEFOLD_TILE_PRODUCT_BODY(Avx2<C>, tile_block_avx2, 4)
}
#undef MOEFOLD_TILE_BLOCK_BODY
#undef MOEFOLD_TILE_BLOCK_ARGS
#undef MOEFOLD_TILE_PRODUCT_ARGS

/// x[i] = exp(x[i] − shift[i·step]) (+ sum[i] += x[i]) with 16 floats at a time: n =
/// round(y·log₂e), r = y − n·ln 2 (two parts), exp(r) by Cephes' degree-6 polynomial, times 2ⁿ by
/// vscalefps (within 1 ulp of the correctly rounded exp wherever it is a normal float, measured
/// over [−103, 88]; y below −104, −∞ included, gives 0).
__attribute__((target("avx512f,fma"))) inline void tile_exp_avx512(float* MOEFOLD_RESTRICT x,
                                                                   std::int64_t n,
                                                                   float const* shift,
                                                                   std::int64_t step,
                                                                   float* MOEFOLD_RESTRICT sum) {
  __m512 const lo = _mm512_set1_ps(-104.f), hi = _mm512_set1_ps(88.7f);
  __m512 const log2e = _mm512_set1_ps(1.44269504088896341f);
  __m512 const ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  for (std::int64_t i = 0; i < n; i += 16) {
    __mmask16 const m = Avx512<float>::mask(n - i);
    __m512 const sh = step ? _mm512_maskz_loadu_ps(m, shift + i) : _mm512_set1_ps(shift[0]);
    __m512 y = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh);
    y = _mm512_maskz_min_ps(m, _mm512_maskz_max_ps(m, y, lo), hi);  // maskz: no undefined lanes
    __m512 const k =
        _mm512_maskz_roundscale_ps(m, _mm512_mul_ps(y, log2e), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(k, ln2_hi, y);
    r = _mm512_fnmadd_ps(k, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    __m512 const e = _mm512_maskz_scalef_ps(m, p, k);
    _mm512_mask_storeu_ps(x + i, m, e);
    if (sum) _mm512_mask_storeu_ps(sum + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, sum + i), e));
  }
}
#undef MOEFOLD_TILE_PRODUCT_BODY
#endif

}  // namespace detail

/// c [M, N] (ld ldc) (+)= a·b with a[r·ar + k·ak] (r < M, k < K) and b [K, N] (ld ldb), by
/// `kernel` (one the processor runs: best_tile_kernel() or portable). Float or double.
template <class C>
MOEFOLD_HD void tile_product(TileKernel kernel, bool add, C* MOEFOLD_RESTRICT c, std::int64_t ldc,
                             C const* MOEFOLD_RESTRICT a, std::int64_t ar, std::int64_t ak,
                             C const* MOEFOLD_RESTRICT b, std::int64_t ldb, std::int64_t M,
                             std::int64_t N, std::int64_t K) {
#if defined(MOEFOLD_TILE_X86)
  if (kernel == TileKernel::avx512)
    return detail::tile_product_avx512(add, c, ldc, a, ar, ak, b, ldb, M, N, K);
  if (kernel == TileKernel::avx2)
    return detail::tile_product_avx2(add, c, ldc, a, ar, ak, b, ldb, M, N, K);
#else
  (void)kernel;
#endif
#if defined(__GNUC__) && !defined(__CUDACC__)
  std::int64_t const W = 64 / static_cast<std::int64_t>(sizeof(C));  // 4 vectors of 16 bytes
  std::int64_t const mb = M - M % 2, nb = N - N % W;
  for (std::int64_t r = 0; r < mb; r += 2)
    for (std::int64_t j0 = 0; j0 < nb; j0 += W)
      detail::tile_block_portable(add, c, ldc, a, ar, ak, b, ldb, r, j0, K);
  detail::tile_product_scalar(add, c, ldc, a, ar, ak, b, ldb, 0, mb, nb, N, K);
  detail::tile_product_scalar(add, c, ldc, a, ar, ak, b, ldb, mb, M, 0, N, K);
#else
  detail::tile_product_scalar(add, c, ldc, a, ar, ak, b, ldb, std::int64_t{0}, M, std::int64_t{0},
                              N, K);
#endif
}

/// x[i] = exp(x[i] − shift[i·step]) for i < n (step 0: one shift, 1: one per element), and
/// sum[i] += x[i] unless sum is null. The avx512 kernel's float path evaluates exp in vectors
/// (ops::detail::tile_exp_avx512, within 1 ulp); the others call exp.
template <class C>
MOEFOLD_HD void tile_exp(TileKernel kernel, C* MOEFOLD_RESTRICT x, std::int64_t n, C const* shift,
                         std::int64_t step, C* MOEFOLD_RESTRICT sum) {
  using std::exp;
#if defined(MOEFOLD_TILE_X86)
  if constexpr (std::is_same_v<C, float>)
    if (kernel == TileKernel::avx512) return detail::tile_exp_avx512(x, n, shift, step, sum);
#endif
  (void)kernel;
  for (std::int64_t i = 0; i < n; ++i) {
    x[i] = exp(x[i] - shift[i * step]);
    if (sum) sum[i] += x[i];
  }
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
