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
/// tile whose smallest position lies after a query tile's largest is skipped, and one wholly at
/// or before it is not masked element by element.
///
/// Precision: q, k, v, o, dO and the gradients in the storage type T (float, double, bf16);
/// scores, probabilities, lse, D and every sum in compute_t<T> (FP32 for bf16, as a fused
/// kernel), each output rounded once. The tile products run on a register kernel chosen once
/// per process (ops/tile_product.hpp: AVX-512 or AVX2 with FMA, or the portable loop).
/// Memory beyond inputs and outputs: lse and D, 2·sq values of compute_t<T> per head; each body
/// keeps on its stack at most four tiles of 64 × kMaxHeadDim and two of 64 × 64 elements of
/// compute_t<T> (two more of 64 × kMaxHeadDim for bf16, whose K/V or Q/dO rows are widened).
///
///   ops::flash_attention_forward(exec, shape, scale, q, k, v, qpos, kpos, o, lse);
///   ops::flash_attention_backward(exec, shape, scale, q, k, v, o, lse, dout, qpos, kpos,
///                                 delta, dq, dk, dv);

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/tile_product.hpp"
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

/// Largest query position of rows [i0, i0 + n), smallest and largest key position of rows
/// [j0, j0 + n).
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

/// xt[c·64 + r] = a·x[(r0 + r)·ld + c] in the compute type for r < n, 0 for the padding rows
/// n ≤ r < 64 (a tile as the right operand of a product with 64 columns).
template <class T, class C>
MOEFOLD_HD void load_transposed(C* MOEFOLD_RESTRICT xt, T const* MOEFOLD_RESTRICT x,
                                std::int64_t ld, std::int64_t r0, std::int64_t n, std::int64_t d,
                                C a) {
  for (std::int64_t c = 0; c < d; ++c)
    for (std::int64_t r = 0; r < kFlashTile; ++r)
      xt[c * kFlashTile + r] = r < n ? a * widen(x[(r0 + r) * ld + c]) : C{0};
}

/// Rows of a tile in the compute type: a pointer and its row stride.
template <class C>
struct TileRows {
  C const* p;
  std::int64_t ld;
};
/// Elements of a staging tile: none when storage and compute type agree (the tile is read in
/// place), 64 rows of the largest head dimension otherwise.
template <class T>
inline constexpr std::int64_t kStage =
    std::is_same_v<T, compute_t<T>> ? 1 : kFlashTile* kMaxHeadDim;

/// Rows [r0, r0 + n) × d of x (ld): in place for float and double, converted into `stage`
/// (ld d) for bf16.
template <class T, class C>
MOEFOLD_HD TileRows<C> tile_rows(T const* x, std::int64_t ld, std::int64_t r0, std::int64_t n,
                                 std::int64_t d, C* stage) {
  if constexpr (std::is_same_v<T, C>) {
    (void)n;
    (void)d;
    (void)stage;
    return {x + r0 * ld, ld};
  } else {
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = 0; c < d; ++c) stage[r * d + c] = widen(x[(r0 + r) * ld + c]);
    return {stage, d};
  }
}

/// acc [n, d] (ld d) rounded once into rows [r0, r0 + n) of out (ld), each row times
/// scale[r] (or 1 when scale is null).
template <class C, class T>
MOEFOLD_HD void store_rows(T* out, std::int64_t ld, std::int64_t r0, std::int64_t n, std::int64_t d,
                           C const* acc, C const* scale) {
  for (std::int64_t r = 0; r < n; ++r) {
    C const f = scale ? scale[r] : C{1};
    for (std::int64_t c = 0; c < d; ++c) out[(r0 + r) * ld + c] = narrow<T>(acc[r * d + c] * f);
  }
}

/// Visible pairs of a query tile (positions qp[0..n)) and key tile (kpos[0..nk)): all of them,
/// some (compare per element), or none.
enum class Visible : unsigned char { none, some, all };
MOEFOLD_HD inline Visible visible(std::int64_t const* qp, std::int64_t n, std::int64_t const* kp,
                                  std::int64_t nk) {
  std::int64_t const qmin = min_pos(qp, 0, n), qmax = max_pos(qp, 0, n);
  std::int64_t const kmin = min_pos(kp, 0, nk), kmax = max_pos(kp, 0, nk);
  return kmin > qmax ? Visible::none : kmax <= qmin ? Visible::all : Visible::some;
}

/// s[j·ks + i·qs] = −∞ for the pairs whose key lies after the query (kp[j] > qp[i]), so that the
/// softmax steps need no mask: exp gives 0 there and the max ignores them.
template <class C>
MOEFOLD_HD void mask_scores(C* s, std::int64_t ks, std::int64_t qs, std::int64_t const* kp,
                            std::int64_t nk, std::int64_t const* qp, std::int64_t n) {
  for (std::int64_t j = 0; j < nk; ++j)
    for (std::int64_t i = 0; i < n; ++i)
      if (kp[j] > qp[i]) s[j * ks + i * qs] = -static_cast<C>(INFINITY);
}
/// The shift of a row's exponentials: its max or logsumexp, 0 when that is −∞ (no visible key
/// yet), so that exp(−∞ − shift) = 0 rather than NaN.
template <class C>
MOEFOLD_HD C finite_shift(C m) {
  return m == -static_cast<C>(INFINITY) ? C{0} : m;
}

}  // namespace detail

/// Body (head bh = b·heads + h, query tile t) at index bh·q_tiles + t: o rows and lse of the
/// tile, by the online softmax over the key tiles. T is the storage type; scores, softmax and
/// the output's accumulation run in C = compute_t<T> (FP32 for bf16), o is rounded once.
template <class T>
struct FlashForward {
  using C = compute_t<T>;
  FlashShape shape;
  C scale;
  T const* q;
  T const* k;
  T const* v;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  T* o;
  C* lse;
  TileKernel kernel;
  MOEFOLD_HD void operator()(std::int64_t index) const {
    using std::exp;
    using std::log;
    constexpr std::int64_t B = kFlashTile;
    QueryTile const tile = shape.query_tile(index);
    std::int64_t const bh = tile.bh, i0 = tile.i0, n = tile.n;
    std::int64_t const d = shape.dim, ldk = shape.ldk();
    T const* const kh = k + shape.k_head(tile.b, tile.g);
    T const* const vh = v + shape.k_head(tile.b, tile.g);
    C qt[kMaxHeadDim * B];   // scale·q of the tile, transposed [d, 64]
    C acc[B * kMaxHeadDim];  // the output rows [n, d], unnormalized
    C ks[detail::kStage<T>], vs[detail::kStage<T>];
    C s[B * B];  // scores, then probabilities, [key, query]
    C m[B], l[B], alpha[B], sum[B], shift[B];
    std::int64_t qp[B];
    detail::load_transposed(qt, q + shape.q_head(tile.b, tile.h), shape.ldq(), i0, n, d, scale);
    C const ninf = -static_cast<C>(INFINITY);
    for (std::int64_t i = 0; i < n; ++i) {
      m[i] = ninf;
      l[i] = C{0};
      qp[i] = qpos[i0 + i];
    }
    for (std::int64_t x = 0; x < n * d; ++x) acc[x] = C{0};
    for (std::int64_t j0 = 0; j0 < shape.sk; j0 += B) {
      std::int64_t const nk = shape.sk - j0 < B ? shape.sk - j0 : B;
      std::int64_t const* const kp = kpos + j0;
      auto const vis = detail::visible(qp, n, kp, nk);
      if (vis == detail::Visible::none) continue;
      auto const kr = detail::tile_rows(kh, ldk, j0, nk, d, ks);
      auto const vr = detail::tile_rows(vh, ldk, j0, nk, d, vs);
      tile_product(kernel, false, s, B, kr.p, kr.ld, std::int64_t{1}, qt, B, nk, B, d);
      if (vis == detail::Visible::some) detail::mask_scores(s, B, std::int64_t{1}, kp, nk, qp, n);
      // New running max; alpha rescales the old sums and outputs; P = exp(s − max).
      for (std::int64_t i = 0; i < n; ++i) alpha[i] = m[i];
      for (std::int64_t j = 0; j < nk; ++j) {
        C const* MOEFOLD_RESTRICT row = s + j * B;
        for (std::int64_t i = 0; i < n; ++i) alpha[i] = alpha[i] < row[i] ? row[i] : alpha[i];
      }
      for (std::int64_t i = 0; i < n; ++i) {
        C const mx = alpha[i];
        alpha[i] = mx == m[i] ? C{1} : exp(m[i] - mx);
        m[i] = mx;
        shift[i] = detail::finite_shift(mx);
        sum[i] = C{0};
      }
      for (std::int64_t j = 0; j < nk; ++j)
        tile_exp(kernel, s + j * B, n, shift, std::int64_t{1}, sum);
      for (std::int64_t i = 0; i < n; ++i) {
        l[i] = l[i] * alpha[i] + sum[i];
        if (alpha[i] != C{1})
          for (std::int64_t c = 0; c < d; ++c) acc[i * d + c] *= alpha[i];
      }
      // acc[i, ·] += Σ_j P[j, i]·v[j, ·]
      tile_product(kernel, true, acc, d, s, std::int64_t{1}, B, vr.p, vr.ld, n, d, nk);
    }
    for (std::int64_t i = 0; i < n; ++i) {
      sum[i] = l[i] > C{0} ? C{1} / l[i] : C{0};
      lse[bh * shape.sq + i0 + i] = l[i] > C{0} ? m[i] + log(l[i]) : ninf;
    }
    detail::store_rows(o + shape.q_head(tile.b, tile.h), shape.ldq(), i0, n, d, acc, sum);
  }
};

/// Body at index bh·sq + i: delta[bh·sq + i] = Σ_c dO[i, c]·O[i, c] of head bh, in C.
template <class T>
struct FlashRowDot {
  using C = compute_t<T>;
  FlashShape shape;
  T const* o;
  T const* dout;
  C* delta;
  MOEFOLD_HD void operator()(std::int64_t index) const {
    std::int64_t const bh = index / shape.sq, i = index % shape.sq;
    std::int64_t const at = shape.q_head(bh / shape.heads, bh % shape.heads) + i * shape.ldq();
    C acc{0};
    for (std::int64_t c = 0; c < shape.dim; ++c) acc += widen(dout[at + c]) * widen(o[at + c]);
    delta[index] = acc;
  }
};

/// The backward's bodies share their inputs: `query_tile` (FlashBackwardQuery) writes the dq
/// rows of (head bh, query tile t) at index bh·q_tiles + t; `key_tile` (FlashBackwardKeyValue)
/// the dk and dv rows of (sequence b, group g, key tile u) at index (b·groups + g)·k_tiles + u,
/// summed over the group's query heads and every query tile, in that order. Sums in C, each
/// output rounded once.
template <class T>
struct FlashBackward {
  using C = compute_t<T>;
  FlashShape shape;
  C scale;
  T const* q;
  T const* k;
  T const* v;
  T const* dout;
  C const* lse;
  C const* delta;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  T* dq;
  T* dk;
  T* dv;
  TileKernel kernel;

  MOEFOLD_HD void query_tile(std::int64_t index) const {
    constexpr std::int64_t B = kFlashTile;
    QueryTile const tile = shape.query_tile(index);
    std::int64_t const bh = tile.bh, i0 = tile.i0, n = tile.n;
    std::int64_t const d = shape.dim, ldq = shape.ldq(), ldk = shape.ldk();
    T const* const kh = k + shape.k_head(tile.b, tile.g);
    T const* const vh = v + shape.k_head(tile.b, tile.g);
    C qt[kMaxHeadDim * B];   // scale·q, transposed
    C dot[kMaxHeadDim * B];  // dO, transposed
    C acc[B * kMaxHeadDim];  // dq rows [n, d]
    C ks[detail::kStage<T>], vs[detail::kStage<T>];
    C s[B * B];   // [key, query]: scores, then dS
    C dp[B * B];  // [key, query]: dO·vᵀ
    C ls[B], dl[B];
    std::int64_t qp[B];
    detail::load_transposed(qt, q + shape.q_head(tile.b, tile.h), ldq, i0, n, d, scale);
    detail::load_transposed(dot, dout + shape.q_head(tile.b, tile.h), ldq, i0, n, d, C{1});
    for (std::int64_t i = 0; i < n; ++i) {
      qp[i] = qpos[i0 + i];
      ls[i] = detail::finite_shift(lse[bh * shape.sq + i0 + i]);
      dl[i] = delta[bh * shape.sq + i0 + i];
    }
    for (std::int64_t x = 0; x < n * d; ++x) acc[x] = C{0};
    for (std::int64_t j0 = 0; j0 < shape.sk; j0 += B) {
      std::int64_t const nk = shape.sk - j0 < B ? shape.sk - j0 : B;
      std::int64_t const* const kp = kpos + j0;
      auto const vis = detail::visible(qp, n, kp, nk);
      if (vis == detail::Visible::none) continue;
      auto const kr = detail::tile_rows(kh, ldk, j0, nk, d, ks);
      auto const vr = detail::tile_rows(vh, ldk, j0, nk, d, vs);
      tile_product(kernel, false, s, B, kr.p, kr.ld, std::int64_t{1}, qt, B, nk, B, d);
      tile_product(kernel, false, dp, B, vr.p, vr.ld, std::int64_t{1}, dot, B, nk, B, d);
      // dS = P·(dP − D)·scale with P = exp(s − lse), 0 where the key lies after the query.
      if (vis == detail::Visible::some) detail::mask_scores(s, B, std::int64_t{1}, kp, nk, qp, n);
      for (std::int64_t j = 0; j < nk; ++j) {
        C* MOEFOLD_RESTRICT row = s + j * B;
        C const* MOEFOLD_RESTRICT dprow = dp + j * B;
        tile_exp(kernel, row, n, ls, std::int64_t{1}, static_cast<C*>(nullptr));
        for (std::int64_t i = 0; i < n; ++i) row[i] = row[i] * (dprow[i] - dl[i]) * scale;
      }
      // acc[i, ·] += Σ_j dS[j, i]·k[j, ·]
      tile_product(kernel, true, acc, d, s, std::int64_t{1}, B, kr.p, kr.ld, n, d, nk);
    }
    detail::store_rows(dq + shape.q_head(tile.b, tile.h), ldq, i0, n, d, acc,
                       static_cast<C const*>(nullptr));
  }

  MOEFOLD_HD void key_tile(std::int64_t index) const {
    constexpr std::int64_t B = kFlashTile;
    std::int64_t const nkt = shape.k_tiles(), bg = index / nkt, u = index % nkt;
    std::int64_t const b = bg / shape.groups, g = bg % shape.groups, d = shape.dim;
    std::int64_t const per = shape.heads / shape.groups;
    std::int64_t const j0 = u * B, nk = shape.sk - j0 < B ? shape.sk - j0 : B;
    std::int64_t const ldq = shape.ldq(), ldk = shape.ldk();
    C kt[kMaxHeadDim * B];   // scale·k of the tile, transposed
    C vt[kMaxHeadDim * B];   // v of the tile, transposed
    C dka[B * kMaxHeadDim];  // dk rows [nk, d]
    C dva[B * kMaxHeadDim];  // dv rows [nk, d]
    C qs[detail::kStage<T>], dos[detail::kStage<T>];
    C s[B * B];   // [query, key]: P
    C dp[B * B];  // [query, key]: dO·vᵀ, then dS
    detail::load_transposed(kt, k + shape.k_head(b, g), ldk, j0, nk, d, scale);
    detail::load_transposed(vt, v + shape.k_head(b, g), ldk, j0, nk, d, C{1});
    std::int64_t const* const kp = kpos + j0;
    for (std::int64_t x = 0; x < nk * d; ++x) {
      dka[x] = C{0};
      dva[x] = C{0};
    }
    for (std::int64_t h = g * per; h < (g + 1) * per; ++h) {
      std::int64_t const bh = b * shape.heads + h;
      T const* const qh = q + shape.q_head(b, h);
      T const* const doh = dout + shape.q_head(b, h);
      for (std::int64_t i0 = 0; i0 < shape.sq; i0 += B) {
        std::int64_t const n = shape.sq - i0 < B ? shape.sq - i0 : B;
        std::int64_t const* const qp = qpos + i0;
        auto const vis = detail::visible(qp, n, kp, nk);
        if (vis == detail::Visible::none) continue;
        auto const qr = detail::tile_rows(qh, ldq, i0, n, d, qs);
        auto const dor = detail::tile_rows(doh, ldq, i0, n, d, dos);
        tile_product(kernel, false, s, B, qr.p, qr.ld, std::int64_t{1}, kt, B, n, B, d);
        tile_product(kernel, false, dp, B, dor.p, dor.ld, std::int64_t{1}, vt, B, n, B, d);
        if (vis == detail::Visible::some) detail::mask_scores(s, std::int64_t{1}, B, kp, nk, qp, n);
        for (std::int64_t i = 0; i < n; ++i) {
          C* MOEFOLD_RESTRICT srow = s + i * B;
          C* MOEFOLD_RESTRICT dprow = dp + i * B;
          C const li = detail::finite_shift(lse[bh * shape.sq + i0 + i]);
          C const di = delta[bh * shape.sq + i0 + i];
          tile_exp(kernel, srow, nk, &li, std::int64_t{0}, static_cast<C*>(nullptr));
          for (std::int64_t j = 0; j < nk; ++j) dprow[j] = srow[j] * (dprow[j] - di) * scale;
        }
        // dv[j, ·] += Σ_i P[i, j]·dO[i, ·];  dk[j, ·] += Σ_i dS[i, j]·q[i, ·]
        tile_product(kernel, true, dva, d, s, std::int64_t{1}, B, dor.p, dor.ld, nk, d, n);
        tile_product(kernel, true, dka, d, dp, std::int64_t{1}, B, qr.p, qr.ld, nk, d, n);
      }
    }
    detail::store_rows(dk + shape.k_head(b, g), ldk, j0, nk, d, dka,
                       static_cast<C const*>(nullptr));
    detail::store_rows(dv + shape.k_head(b, g), ldk, j0, nk, d, dva,
                       static_cast<C const*>(nullptr));
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
                 View<std::int64_t const, typename Exec::memory_space> kpos, TileKernel kernel) {
  MOEFOLD_EXPECTS(tile_kernel_available(kernel),
                  "{}: the {} tile kernel does not run on this processor (or build)", op,
                  to_string(kernel));
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
/// T: float, double or bf16 (scores, softmax, lse and sums in compute_t<T>). `kernel`: the
/// tile products' register kernel (ops/tile_product.hpp), by default the widest this processor
/// runs.
template <class Exec, class T>
void flash_attention_forward(Exec const& exec, FlashShape const& sh,
                             std::type_identity_t<compute_t<T>> scale, InView<Exec, T> q,
                             InView<Exec, T> k, InView<Exec, T> v,
                             View<std::int64_t const, typename Exec::memory_space> qpos,
                             View<std::int64_t const, typename Exec::memory_space> kpos,
                             OutView<Exec, T> o, OutView<Exec, compute_t<T>> lse,
                             TileKernel kernel = best_tile_kernel()) {
  detail::check_flash<Exec, T>("ops::flash_attention_forward", sh, q, k, v, qpos, kpos, kernel);
  MOEFOLD_EXPECTS(o.size() == q.size() && lse.size() == sh.batch * sh.heads * sh.sq,
                  "ops::flash_attention_forward: output {} (expected {}), lse {} (expected {})",
                  o.size(), q.size(), lse.size(), sh.batch * sh.heads * sh.sq);
  for_each_row(exec, sh.batch * sh.heads * sh.q_tiles(),
               FlashForward<T>{sh, scale, q.data(), k.data(), v.data(), qpos.data(), kpos.data(),
                               o.data(), lse.data(), kernel});
}

/// dq, dk, dv (overwritten, each rounded once) from dout and the forward's o and lse; delta
/// [batch·heads, sq] is the caller's workspace.
template <class Exec, class T>
void flash_attention_backward(Exec const& exec, FlashShape const& sh,
                              std::type_identity_t<compute_t<T>> scale, InView<Exec, T> q,
                              InView<Exec, T> k, InView<Exec, T> v, InView<Exec, T> o,
                              InView<Exec, compute_t<T>> lse, InView<Exec, T> dout,
                              View<std::int64_t const, typename Exec::memory_space> qpos,
                              View<std::int64_t const, typename Exec::memory_space> kpos,
                              OutView<Exec, compute_t<T>> delta, OutView<Exec, T> dq,
                              OutView<Exec, T> dk, OutView<Exec, T> dv,
                              TileKernel kernel = best_tile_kernel()) {
  detail::check_flash<Exec, T>("ops::flash_attention_backward", sh, q, k, v, qpos, kpos, kernel);
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
                           dq.data(),   dk.data(),  dv.data(),    kernel};
  for_each_row(exec, sh.batch * sh.heads * sh.q_tiles(), FlashBackwardQuery<T>{f});
  for_each_row(exec, sh.batch * sh.groups * sh.k_tiles(), FlashBackwardKeyValue<T>{f});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
