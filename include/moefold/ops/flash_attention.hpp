#pragma once
/// \file
/// Causal attention without an S×S matrix (FlashAttention's algorithm, tiled, online softmax),
/// the CPU op of nn/attention.hpp. Per head (b, h) of query group g = h / (heads/groups):
///
///   forward   s = scale·q·kᵀ masked by kpos[j] ≤ qpos[i];  o = softmax(s)·v;  lse = log Σ exp s
///             one body per (head, query tile): over the key tiles it keeps each row's running
///             max m and sum l, rescales its output rows by exp(m_old − m_new), adds P·v; only o
///             and the row logsumexp are stored.
///   backward  P = exp(s − lse) recomputed tile by tile, D = rowsum(dO ∘ O),
///             dS = P ∘ (dO·vᵀ − D),  dq = scale·dS·k,  dk = scale·dSᵀ·q,  dv = Pᵀ·dO
///             bodies own their outputs: D per query row, dq per (head, query tile), dk and dv
///             per (sequence, group, key tile), which walks the group's query heads and the
///             query tiles in a fixed order (no atomics; bitwise the same in any body order).
///
/// Layout (the layer's): token (i, b) is row i·batch + b; q and o are [sq·batch, heads·d], k and
/// v [sk·batch, groups·d], head h in columns [h·d, (h+1)·d); lse and D are [batch·heads, sq].
/// The mask compares global positions (context parallelism gathers keys out of order); a key
/// tile whose smallest position lies after a query tile's largest is skipped.
/// Memory beyond inputs and outputs: lse and D, 2·sq values per head; each body keeps at most
/// two tiles of kMaxHeadDim × 64 and two of 64 × 64 elements on its stack.
///
///   ops::flash_attention_forward(exec, shape, scale, q, k, v, qpos, kpos, o, lse);
///   ops::flash_attention_backward(exec, shape, scale, q, k, v, o, lse, dout, qpos, kpos,
///                                 delta, dq, dk, dv);

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/view_args.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

inline constexpr std::int64_t kFlashTile = 64;    ///< query and key rows per tile
inline constexpr std::int64_t kMaxHeadDim = 256;  ///< largest head dimension (stack tiles)

/// Query tile `index` = bh·q_tiles + t: head bh = b·heads + h of group g, rows [i0, i0 + n).
struct QueryTile {
  std::int64_t bh, b, h, g, i0, n;
};

/// Sizes of one attention call: `batch` sequences, `heads` query heads in `groups` KV groups,
/// `sq` query and `sk` key positions, head dimension `dim`.
struct FlashShape {
  std::int64_t batch = 0, heads = 0, groups = 0, sq = 0, sk = 0, dim = 0;
  MOEFOLD_HD std::int64_t q_tiles() const { return (sq + kFlashTile - 1) / kFlashTile; }
  MOEFOLD_HD std::int64_t k_tiles() const { return (sk + kFlashTile - 1) / kFlashTile; }
  MOEFOLD_HD std::int64_t ldq() const { return batch * heads * dim; }
  MOEFOLD_HD std::int64_t ldk() const { return batch * groups * dim; }
  /// First element of head h of sequence b in q / o, and of group g in k / v.
  MOEFOLD_HD std::int64_t q_head(std::int64_t b, std::int64_t h) const {
    return (b * heads + h) * dim;
  }
  MOEFOLD_HD std::int64_t k_head(std::int64_t b, std::int64_t g) const {
    return (b * groups + g) * dim;
  }
  MOEFOLD_HD QueryTile query_tile(std::int64_t index) const {
    std::int64_t const bh = index / q_tiles(), i0 = index % q_tiles() * kFlashTile;
    std::int64_t const h = bh % heads;
    return {
        bh, bh / heads, h, h / (heads / groups), i0, sq - i0 < kFlashTile ? sq - i0 : kFlashTile};
  }
};

namespace detail {

/// Largest query position of rows [i0, i0 + n), smallest key position of rows [j0, j0 + n).
MOEFOLD_HD inline std::int64_t max_pos(std::int64_t const* p, std::int64_t i0, std::int64_t n) {
  std::int64_t m = p[i0];
  for (std::int64_t i = 1; i < n; ++i) m = m < p[i0 + i] ? p[i0 + i] : m;
  return m;
}
MOEFOLD_HD inline std::int64_t min_pos(std::int64_t const* p, std::int64_t j0, std::int64_t n) {
  std::int64_t m = p[j0];
  for (std::int64_t j = 1; j < n; ++j) m = p[j0 + j] < m ? p[j0 + j] : m;
  return m;
}

/// xt[c·64 + r] = a·x[(r0 + r)·ld + c] for r < n, 0 for the padding rows n ≤ r < 64.
template <class T>
MOEFOLD_HD void load_transposed(T* MOEFOLD_RESTRICT xt, T const* MOEFOLD_RESTRICT x,
                                std::int64_t ld, std::int64_t r0, std::int64_t n, std::int64_t d,
                                T a) {
  for (std::int64_t c = 0; c < d; ++c)
    for (std::int64_t r = 0; r < kFlashTile; ++r)
      xt[c * kFlashTile + r] = r < n ? a * x[(r0 + r) * ld + c] : T{0};
}

#if defined(__GNUC__) && !defined(__CUDACC__)
/// Two rows × 4 vectors of `Bytes` bytes of `accumulate_rows`, the sums in registers
/// (element-wise vector arithmetic, no fused multiply-add: every element sums in the same order
/// and rounds the same as in the scalar loop, whatever the vector width).
#define MOEFOLD_FLASH_BLOCK_BODY                           \
  typedef T V __attribute__((vector_size(Bytes)));         \
  constexpr std::int64_t n = Bytes / sizeof(T);            \
  V a[4], b[4];                                            \
  for (int u = 0; u < 4; ++u) {                            \
    a[u] = V{};                                            \
    b[u] = V{};                                            \
    if (add) {                                             \
      __builtin_memcpy(&a[u], o0 + c0 + u * n, sizeof(V)); \
      __builtin_memcpy(&b[u], o1 + c0 + u * n, sizeof(V)); \
    }                                                      \
  }                                                        \
  for (std::int64_t k = 0; k < K; ++k) {                   \
    T const* yk = y + k * ldy + c0;                        \
    V const s = V{} + x0[k * xk], t = V{} + x1[k * xk];    \
    for (int u = 0; u < 4; ++u) {                          \
      V yv;                                                \
      __builtin_memcpy(&yv, yk + u * n, sizeof(V));        \
      a[u] += s * yv;                                      \
      b[u] += t * yv;                                      \
    }                                                      \
  }                                                        \
  for (int u = 0; u < 4; ++u) {                            \
    __builtin_memcpy(o0 + c0 + u * n, &a[u], sizeof(V));   \
    __builtin_memcpy(o1 + c0 + u * n, &b[u], sizeof(V));   \
  }

template <class T, int Bytes>
inline void accumulate_block(bool add, T* o0, T* o1, std::int64_t c0, T const* x0, T const* x1,
                             std::int64_t xk, T const* y, std::int64_t ldy, std::int64_t K) {
  MOEFOLD_FLASH_BLOCK_BODY
}
#if defined(__x86_64__)
/// The same with 32-byte AVX vectors (AVX only: no FMA, so the results are bitwise the same as
/// the 16-byte path's), chosen at run time where the processor has AVX2.
template <class T, int Bytes>
__attribute__((target("avx2"))) void accumulate_block_avx(bool add, T* o0, T* o1, std::int64_t c0,
                                                          T const* x0, T const* x1, std::int64_t xk,
                                                          T const* y, std::int64_t ldy,
                                                          std::int64_t K) {
  MOEFOLD_FLASH_BLOCK_BODY
}
inline bool flash_avx() {
  static bool const yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif
#undef MOEFOLD_FLASH_BLOCK_BODY
#endif

/// The scalar loop of `accumulate_rows` over rows [r0, r1) and columns [c0, c1).
template <class T>
MOEFOLD_HD void accumulate_scalar(bool add, T* MOEFOLD_RESTRICT out, std::int64_t ldo,
                                  T const* MOEFOLD_RESTRICT x, std::int64_t xr, std::int64_t xk,
                                  T const* MOEFOLD_RESTRICT y, std::int64_t ldy, std::int64_t r0,
                                  std::int64_t r1, std::int64_t c0, std::int64_t c1,
                                  std::int64_t K) {
  for (std::int64_t r = r0; r < r1; ++r)
    for (std::int64_t c = c0; c < c1; ++c) {
      T acc = add ? out[r * ldo + c] : T{0};
      for (std::int64_t k = 0; k < K; ++k) acc += x[r * xr + k * xk] * y[k * ldy + c];
      out[r * ldo + c] = acc;
    }
}

/// out[r·ldo + c] (+)= Σ_k x[r·xr + k·xk] · y[k·ldy + c] for r < M, c < N, k in increasing
/// order. On host compilers, blocks of 2 rows × 4 vectors keep their sums in registers.
template <class T>
MOEFOLD_HD void accumulate_rows(bool add, T* MOEFOLD_RESTRICT out, std::int64_t ldo,
                                T const* MOEFOLD_RESTRICT x, std::int64_t xr, std::int64_t xk,
                                T const* MOEFOLD_RESTRICT y, std::int64_t ldy, std::int64_t M,
                                std::int64_t N, std::int64_t K) {
#if defined(__GNUC__) && !defined(__CUDACC__)
#if defined(__x86_64__)
  bool const avx = flash_avx();
#else
  bool const avx = false;
#endif
  std::int64_t const W = (avx ? 128 : 64) / static_cast<std::int64_t>(sizeof(T));
  std::int64_t const mb = M - M % 2, cb = N - N % W;
  for (std::int64_t r = 0; r < mb; r += 2)
    for (std::int64_t c0 = 0; c0 < cb; c0 += W) {
#if defined(__x86_64__)
      if (avx) {
        accumulate_block_avx<T, 32>(add, out + r * ldo, out + (r + 1) * ldo, c0, x + r * xr,
                                    x + (r + 1) * xr, xk, y, ldy, K);
        continue;
      }
#endif
      accumulate_block<T, 16>(add, out + r * ldo, out + (r + 1) * ldo, c0, x + r * xr,
                              x + (r + 1) * xr, xk, y, ldy, K);
    }
  accumulate_scalar(add, out + cb, ldo, x, xr, xk, y + cb, ldy, 0, mb, 0, N - cb, K);
  accumulate_scalar(add, out, ldo, x, xr, xk, y, ldy, mb, M, 0, N, K);
#else
  accumulate_scalar(add, out, ldo, x, xr, xk, y, ldy, 0, M, 0, N, K);
#endif
}

/// out[j·64 + i] = Σ_c y[(j0 + j)·ld + c] · xt[c·64 + i] for j < n (all 64 columns i).
template <class T>
MOEFOLD_HD void tile_product(T* MOEFOLD_RESTRICT out, T const* MOEFOLD_RESTRICT y, std::int64_t ld,
                             std::int64_t j0, std::int64_t n, std::int64_t d,
                             T const* MOEFOLD_RESTRICT xt) {
  accumulate_rows(false, out, kFlashTile, y + j0 * ld, ld, std::int64_t{1}, xt, kFlashTile, n,
                  kFlashTile, d);
}

}  // namespace detail

/// Body (head bh = b·heads + h, query tile t) at index bh·q_tiles + t: o rows and lse of the
/// tile, by the online softmax over the key tiles.
template <class T>
struct FlashForward {
  FlashShape shape;
  T scale;
  T const* q;
  T const* k;
  T const* v;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  T* o;
  T* lse;
  MOEFOLD_HD void operator()(std::int64_t index) const {
    using std::exp;
    using std::log;
    constexpr std::int64_t B = kFlashTile;
    QueryTile const tile = shape.query_tile(index);
    std::int64_t const bh = tile.bh, b = tile.b, h = tile.h, g = tile.g, i0 = tile.i0, n = tile.n;
    std::int64_t const d = shape.dim, ldq = shape.ldq(), ldk = shape.ldk();
    T const* const qh = q + shape.q_head(b, h);
    T const* const kh = k + shape.k_head(b, g);
    T const* const vh = v + shape.k_head(b, g);
    T* const oh = o + shape.q_head(b, h);
    T qt[kMaxHeadDim * B];  // scale·q of the tile, transposed [d, 64]
    T s[B * B];             // scores, then probabilities, [key, query]
    T m[B], l[B], alpha[B];
    detail::load_transposed(qt, qh, ldq, i0, n, d, scale);
    std::int64_t const qmax = detail::max_pos(qpos, i0, n);
    T const ninf = -static_cast<T>(INFINITY);
    for (std::int64_t i = 0; i < B; ++i) {
      m[i] = ninf;
      l[i] = T{0};
    }
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < d; ++c) oh[(i0 + i) * ldq + c] = T{0};
    for (std::int64_t j0 = 0; j0 < shape.sk; j0 += B) {
      std::int64_t const nk = shape.sk - j0 < B ? shape.sk - j0 : B;
      if (detail::min_pos(kpos, j0, nk) > qmax) continue;
      detail::tile_product(s, kh, ldk, j0, nk, d, qt);
      // Running max over the tile's visible keys, then the rescale factor of the old rows.
      for (std::int64_t i = 0; i < n; ++i) {
        std::int64_t const qp = qpos[i0 + i];
        T mx = m[i];
        for (std::int64_t j = 0; j < nk; ++j)
          if (kpos[j0 + j] <= qp && mx < s[j * B + i]) mx = s[j * B + i];
        alpha[i] = mx == m[i] ? T{1} : exp(m[i] - mx);
        m[i] = mx;
        T sum{0};
        for (std::int64_t j = 0; j < nk; ++j) {
          T const p = kpos[j0 + j] <= qp ? exp(s[j * B + i] - mx) : T{0};
          s[j * B + i] = p;
          sum += p;
        }
        l[i] = l[i] * alpha[i] + sum;
      }
      for (std::int64_t i = 0; i < n; ++i) {
        T* MOEFOLD_RESTRICT orow = oh + (i0 + i) * ldq;
        T const a = alpha[i];
        if (a != T{1})
          for (std::int64_t c = 0; c < d; ++c) orow[c] *= a;
      }
      // o[i, ·] += Σ_j P[j, i]·v[j, ·]
      detail::accumulate_rows(true, oh + i0 * ldq, ldq, s, std::int64_t{1}, B, vh + j0 * ldk, ldk,
                              n, d, nk);
    }
    for (std::int64_t i = 0; i < n; ++i) {
      T* MOEFOLD_RESTRICT orow = oh + (i0 + i) * ldq;
      T const inv = l[i] > T{0} ? T{1} / l[i] : T{0};
      for (std::int64_t c = 0; c < d; ++c) orow[c] *= inv;
      lse[bh * shape.sq + i0 + i] = l[i] > T{0} ? m[i] + log(l[i]) : ninf;
    }
  }
};

/// Body at index bh·sq + i: delta[bh·sq + i] = Σ_c dO[i, c]·O[i, c] of head bh.
template <class T>
struct FlashRowDot {
  FlashShape shape;
  T const* o;
  T const* dout;
  T* delta;
  MOEFOLD_HD void operator()(std::int64_t index) const {
    std::int64_t const bh = index / shape.sq, i = index % shape.sq;
    std::int64_t const at = shape.q_head(bh / shape.heads, bh % shape.heads) + i * shape.ldq();
    T acc{0};
    for (std::int64_t c = 0; c < shape.dim; ++c) acc += dout[at + c] * o[at + c];
    delta[index] = acc;
  }
};

/// The backward's bodies share their inputs: `query_tile` (FlashBackwardQuery) writes the dq
/// rows of (head bh, query tile t) at index bh·q_tiles + t; `key_tile` (FlashBackwardKeyValue)
/// the dk and dv rows of (sequence b, group g, key tile u) at index (b·groups + g)·k_tiles + u,
/// summed over the group's query heads and every query tile, in that order.
template <class T>
struct FlashBackward {
  FlashShape shape;
  T scale;
  T const* q;
  T const* k;
  T const* v;
  T const* dout;
  T const* lse;
  T const* delta;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  T* dq;
  T* dk;
  T* dv;

  /// P[i, j] of head bh from its (scaled) score s; 0 where the key lies after the query.
  MOEFOLD_HD T prob(std::int64_t bh, std::int64_t i, std::int64_t j, T s) const {
    using std::exp;
    return kpos[j] <= qpos[i] ? exp(s - lse[bh * shape.sq + i]) : T{0};
  }
  /// dS[i, j] = P·(dP − D[i])·scale.
  MOEFOLD_HD T grad(std::int64_t bh, std::int64_t i, T p, T dp) const {
    return p * (dp - delta[bh * shape.sq + i]) * scale;
  }

  MOEFOLD_HD void query_tile(std::int64_t index) const {
    constexpr std::int64_t B = kFlashTile;
    QueryTile const tile = shape.query_tile(index);
    std::int64_t const bh = tile.bh, b = tile.b, h = tile.h, g = tile.g, i0 = tile.i0, n = tile.n;
    std::int64_t const d = shape.dim, ldq = shape.ldq(), ldk = shape.ldk();
    T const* const kh = k + shape.k_head(b, g);
    T const* const vh = v + shape.k_head(b, g);
    T* const dqh = dq + shape.q_head(b, h);
    T qt[kMaxHeadDim * B];   // scale·q, transposed
    T dot[kMaxHeadDim * B];  // dO, transposed
    T s[B * B];              // P, then dS
    T dp[B * B];             // dO·vᵀ
    detail::load_transposed(qt, q + shape.q_head(b, h), ldq, i0, n, d, scale);
    detail::load_transposed(dot, dout + shape.q_head(b, h), ldq, i0, n, d, T{1});
    std::int64_t const qmax = detail::max_pos(qpos, i0, n);
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t c = 0; c < d; ++c) dqh[(i0 + i) * ldq + c] = T{0};
    for (std::int64_t j0 = 0; j0 < shape.sk; j0 += B) {
      std::int64_t const nk = shape.sk - j0 < B ? shape.sk - j0 : B;
      if (detail::min_pos(kpos, j0, nk) > qmax) continue;
      detail::tile_product(s, kh, ldk, j0, nk, d, qt);
      detail::tile_product(dp, vh, ldk, j0, nk, d, dot);
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t j = 0; j < nk; ++j) {
          T const p = prob(bh, i0 + i, j0 + j, s[j * B + i]);
          s[j * B + i] = grad(bh, i0 + i, p, dp[j * B + i]);
        }
      }
      // dq[i, ·] += Σ_j dS[j, i]·k[j, ·]
      detail::accumulate_rows(true, dqh + i0 * ldq, ldq, s, std::int64_t{1}, B, kh + j0 * ldk, ldk,
                              n, d, nk);
    }
  }

  MOEFOLD_HD void key_tile(std::int64_t index) const {
    constexpr std::int64_t B = kFlashTile;
    std::int64_t const nkt = shape.k_tiles(), bg = index / nkt, u = index % nkt;
    std::int64_t const b = bg / shape.groups, g = bg % shape.groups, d = shape.dim;
    std::int64_t const per = shape.heads / shape.groups;
    std::int64_t const j0 = u * B, nk = shape.sk - j0 < B ? shape.sk - j0 : B;
    std::int64_t const ldq = shape.ldq(), ldk = shape.ldk();
    T* const dkh = dk + shape.k_head(b, g);
    T* const dvh = dv + shape.k_head(b, g);
    T kt[kMaxHeadDim * B];  // k of the tile, transposed
    T vt[kMaxHeadDim * B];  // v of the tile, transposed
    T s[B * B];             // [query, key]: P
    T dp[B * B];            // [query, key]: dO·vᵀ, then dS
    detail::load_transposed(kt, k + shape.k_head(b, g), ldk, j0, nk, d, scale);
    detail::load_transposed(vt, v + shape.k_head(b, g), ldk, j0, nk, d, T{1});
    std::int64_t const kmin = detail::min_pos(kpos, j0, nk);
    for (std::int64_t j = 0; j < nk; ++j)
      for (std::int64_t c = 0; c < d; ++c) {
        dkh[(j0 + j) * ldk + c] = T{0};
        dvh[(j0 + j) * ldk + c] = T{0};
      }
    for (std::int64_t h = g * per; h < (g + 1) * per; ++h) {
      std::int64_t const bh = b * shape.heads + h;
      T const* const qh = q + shape.q_head(b, h);
      T const* const doh = dout + shape.q_head(b, h);
      for (std::int64_t i0 = 0; i0 < shape.sq; i0 += B) {
        std::int64_t const n = shape.sq - i0 < B ? shape.sq - i0 : B;
        if (kmin > detail::max_pos(qpos, i0, n)) continue;
        detail::tile_product(s, qh, ldq, i0, n, d, kt);
        detail::tile_product(dp, doh, ldq, i0, n, d, vt);
        for (std::int64_t i = 0; i < n; ++i) {
          for (std::int64_t j = 0; j < nk; ++j) {
            T const p = prob(bh, i0 + i, j0 + j, s[i * B + j]);
            s[i * B + j] = p;
            dp[i * B + j] = grad(bh, i0 + i, p, dp[i * B + j]);
          }
        }
        // dv[j, ·] += Σ_i P[i, j]·dO[i, ·];  dk[j, ·] += Σ_i dS[i, j]·q[i, ·]
        detail::accumulate_rows(true, dvh + j0 * ldk, ldk, s, std::int64_t{1}, B, doh + i0 * ldq,
                                ldq, nk, d, n);
        detail::accumulate_rows(true, dkh + j0 * ldk, ldk, dp, std::int64_t{1}, B, qh + i0 * ldq,
                                ldq, nk, d, n);
      }
    }
  }
};

template <class T>
struct FlashBackwardQuery {
  FlashBackward<T> f;
  MOEFOLD_HD void operator()(std::int64_t index) const { f.query_tile(index); }
};
template <class T>
struct FlashBackwardKeyValue {
  FlashBackward<T> f;
  MOEFOLD_HD void operator()(std::int64_t index) const { f.key_tile(index); }
};

namespace detail {
template <class Exec, class T>
void check_flash(char const* op, FlashShape const& sh, InView<Exec, T> q, InView<Exec, T> k,
                 InView<Exec, T> v, View<std::int64_t const, typename Exec::memory_space> qpos,
                 View<std::int64_t const, typename Exec::memory_space> kpos) {
  MOEFOLD_EXPECTS(sh.batch > 0 && sh.heads > 0 && sh.groups > 0 && sh.sq > 0 && sh.sk > 0 &&
                      sh.dim > 0 && sh.heads % sh.groups == 0,
                  "{}: batch {}, heads {}, groups {}, sq {}, sk {}, dim {} must be positive with "
                  "heads divisible by groups",
                  op, sh.batch, sh.heads, sh.groups, sh.sq, sh.sk, sh.dim);
  MOEFOLD_EXPECTS(sh.dim <= kMaxHeadDim, "{}: head dimension {} exceeds the largest supported, {}",
                  op, sh.dim, kMaxHeadDim);
  MOEFOLD_EXPECTS(q.size() == sh.sq * sh.ldq() && k.size() == sh.sk * sh.ldk() &&
                      v.size() == k.size() && qpos.size() == sh.sq && kpos.size() == sh.sk,
                  "{}: q {}, k {}, v {} elements and {} query, {} key positions do not match "
                  "batch {}, heads {}, groups {}, sq {}, sk {}, dim {}",
                  op, q.size(), k.size(), v.size(), qpos.size(), kpos.size(), sh.batch, sh.heads,
                  sh.groups, sh.sq, sh.sk, sh.dim);
}
}  // namespace detail

/// o [sq·batch, heads·d] and lse [batch·heads, sq] of causal attention (all views contiguous).
template <class Exec, class T>
void flash_attention_forward(Exec const& exec, FlashShape const& sh, T scale, InView<Exec, T> q,
                             InView<Exec, T> k, InView<Exec, T> v,
                             View<std::int64_t const, typename Exec::memory_space> qpos,
                             View<std::int64_t const, typename Exec::memory_space> kpos,
                             OutView<Exec, T> o, OutView<Exec, T> lse) {
  detail::check_flash<Exec, T>("ops::flash_attention_forward", sh, q, k, v, qpos, kpos);
  MOEFOLD_EXPECTS(o.size() == q.size() && lse.size() == sh.batch * sh.heads * sh.sq,
                  "ops::flash_attention_forward: output {} (expected {}), lse {} (expected {})",
                  o.size(), q.size(), lse.size(), sh.batch * sh.heads * sh.sq);
  for_each_row(exec, sh.batch * sh.heads * sh.q_tiles(),
               FlashForward<T>{sh, scale, q.data(), k.data(), v.data(), qpos.data(), kpos.data(),
                               o.data(), lse.data()});
}

/// dq, dk, dv (overwritten) from dout and the forward's o and lse; delta [batch·heads, sq] is
/// the caller's workspace.
template <class Exec, class T>
void flash_attention_backward(Exec const& exec, FlashShape const& sh, T scale, InView<Exec, T> q,
                              InView<Exec, T> k, InView<Exec, T> v, InView<Exec, T> o,
                              InView<Exec, T> lse, InView<Exec, T> dout,
                              View<std::int64_t const, typename Exec::memory_space> qpos,
                              View<std::int64_t const, typename Exec::memory_space> kpos,
                              OutView<Exec, T> delta, OutView<Exec, T> dq, OutView<Exec, T> dk,
                              OutView<Exec, T> dv) {
  detail::check_flash<Exec, T>("ops::flash_attention_backward", sh, q, k, v, qpos, kpos);
  std::int64_t const rows = sh.batch * sh.heads * sh.sq;
  MOEFOLD_EXPECTS(o.size() == q.size() && dout.size() == q.size() && dq.size() == q.size() &&
                      dk.size() == k.size() && dv.size() == k.size() && lse.size() == rows &&
                      delta.size() == rows,
                  "ops::flash_attention_backward: o {}, dout {}, dq {} (expected {}); dk {}, dv "
                  "{} (expected {}); lse {}, delta {} (expected {})",
                  o.size(), dout.size(), dq.size(), q.size(), dk.size(), dv.size(), k.size(),
                  lse.size(), delta.size(), rows);
  for_each(exec, rows, FlashRowDot<T>{sh, o.data(), dout.data(), delta.data()});
  FlashBackward<T> const f{sh,          scale,      q.data(),     k.data(),    v.data(),
                           dout.data(), lse.data(), delta.data(), qpos.data(), kpos.data(),
                           dq.data(),   dk.data(),  dv.data()};
  for_each_row(exec, sh.batch * sh.heads * sh.q_tiles(), FlashBackwardQuery<T>{f});
  for_each_row(exec, sh.batch * sh.groups * sh.k_tiles(), FlashBackwardKeyValue<T>{f});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
