#pragma once
/// \file
/// Row movement bodies of the MoE permutation and their launchers: row gather (`out[i] =
/// in[src[i]]`, optionally scaled by w[i]), the weighted gather-sum that is `unpermute` written
/// as a gather over each target's rows, row dots (the weights' gradient), the expert-major keys
/// of a routing map and the token of each sorted entry. Rows are `[·, H]` row-major, contiguous.
///
///   ops::gather_rows(exec, src, in, out);                 // out[i] = in[src[i]]
///   ops::gather_sum_rows(exec, offsets, rows_of, w, rows, out);   // out[r] = Σ w[i]·rows[i]
///
/// On the host, an unscaled row copy uses non-temporal stores (the gathered rows are written
/// once and read much later) and prefetches the next source row; `gather_rows` fences them.

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#endif

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

namespace detail {
/// Copies one row of n; `next` (the following source row, may be null) is prefetched along the
/// way: rows are a page each at typical H, where the hardware prefetcher stops.
template <class T>
MOEFOLD_HD inline void copy_row(T* __restrict dst, T const* __restrict src, std::int64_t n,
                                T const* next) {
#if !defined(__CUDA_ARCH__)
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (n >= 256 && n % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0) {
      for (std::int64_t c = 0; c < n; c += 16) {
        if (next) __builtin_prefetch(next + c);
        _mm_stream_ps(dst + c, _mm_loadu_ps(src + c));
        _mm_stream_ps(dst + c + 4, _mm_loadu_ps(src + c + 4));
        _mm_stream_ps(dst + c + 8, _mm_loadu_ps(src + c + 8));
        _mm_stream_ps(dst + c + 12, _mm_loadu_ps(src + c + 12));
      }
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (n >= 128 && n % 2 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0) {
      for (std::int64_t c = 0; c < n; c += 2) _mm_stream_pd(dst + c, _mm_loadu_pd(src + c));
      return;
    }
  }
#endif
  (void)next;
  std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
#else
  (void)next;
  for (std::int64_t c = 0; c < n; ++c) dst[c] = src[c];
#endif
}
/// Orders the host's non-temporal stores of `copy_row` before later loads.
inline void copy_rows_done() {
#if defined(__SSE2__) && !defined(__CUDA_ARCH__)
  _mm_sfence();
#endif
}
template <class T>
MOEFOLD_HD inline void prefetch_row(T const* p, std::int64_t n) {
#if !defined(__CUDA_ARCH__)
  for (std::int64_t c = 0; c < n; c += static_cast<std::int64_t>(64 / sizeof(T)))
    __builtin_prefetch(p + c);
#else
  (void)p;
  (void)n;
#endif
}
/// ⟨x, y⟩ over n values, summed in order in `compute_t<T>`.
template <class T>
MOEFOLD_HD inline T row_dot(T const* x, T const* y, std::int64_t n) {
  compute_t<T> s = 0;
  for (std::int64_t c = 0; c < n; ++c) s += widen(x[c]) * widen(y[c]);
  return narrow<T>(s);
}
/// o = w · s over n values.
template <class T>
MOEFOLD_HD inline void scale_row(T* __restrict o, T const* __restrict s, compute_t<T> w,
                                 std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) o[c] = narrow<T>(w * widen(s[c]));
}
}  // namespace detail

/// Row i of out = row src[i] of in (h values each).
template <class T>
struct GatherRows {
  std::int64_t const* src;
  T const* in;
  T* out;
  std::int64_t rows, h;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    T const* next = i + 1 < rows ? in + src[i + 1] * h : nullptr;
    detail::copy_row(out + i * h, in + src[i] * h, h, next);
  }
};

/// Row i of out = w[i] · row src[i] of in.
template <class T>
struct ScaledGatherRows {
  std::int64_t const* src;
  T const* w;
  T const* in;
  T* out;
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    detail::scale_row(out + i * h, in + src[i] * h, widen(w[i]), h);
  }
};

/// Row r of out = Σ_{k ∈ [offsets[r], offsets[r+1])} w[rows_of[k]] · rows[rows_of[k]], summed in
/// k order (w = 1 when null; no row: 0). Prefetches the next target's rows.
template <class T>
struct GatherSumRows {
  std::int64_t const* offsets;  ///< [R + 1]
  std::int64_t const* rows_of;  ///< [N], each target's rows ascending
  T const* w;                   ///< [N] or null
  T const* rows;                ///< [N, h]
  T* out;                       ///< [R, h]
  std::int64_t targets, h;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    T* __restrict o = out + r * h;
    std::int64_t const b = offsets[r], e = offsets[r + 1];
    if (b == e) {
      for (std::int64_t c = 0; c < h; ++c) o[c] = T(0);
      return;
    }
    std::int64_t const nb = r + 1 < targets ? offsets[r + 1] : 0;
    std::int64_t const ne = r + 1 < targets ? offsets[r + 2] : 0;
    for (std::int64_t k = b; k < e; ++k) {
      std::int64_t const i = rows_of[k];
      T const* __restrict s = rows + i * h;
      if (nb + (k - b) < ne) detail::prefetch_row(rows + rows_of[nb + (k - b)] * h, h);
      compute_t<T> const wi = w ? widen(w[i]) : compute_t<T>(1);
      if (k == b)
        for (std::int64_t c = 0; c < h; ++c) o[c] = narrow<T>(wi * widen(s[c]));
      else
        for (std::int64_t c = 0; c < h; ++c) o[c] = narrow<T>(widen(o[c]) + wi * widen(s[c]));
    }
  }
};

/// Row i of out = *src[i] (w null), or w[i] · *src[i]: the rows of `GatherRows` read through a
/// pointer per row (rows that live in other buffers, e.g. a peer rank's).
template <class T>
struct GatherRowPtrs {
  T const* const* src;  ///< [N] row starts
  T const* w;           ///< [N] or null
  T* out;               ///< [N, h]
  std::int64_t rows, h;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    T const* s = src[i];
    T* o = out + i * h;
    if (!w) {
      detail::copy_row(o, s, h, i + 1 < rows ? src[i + 1] : nullptr);
      return;
    }
    detail::scale_row(o, s, widen(w[i]), h);
  }
};

/// out[i] = ⟨*a[i], b[i]⟩ over h values, summed in order (`RowDots` through row pointers).
template <class T>
struct RowDotPtrs {
  T const* const* a;  ///< [N] row starts
  T const* b;         ///< [N, h]
  T* out;
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    out[i] = detail::row_dot(a[i], b + i * h, h);
  }
};

/// The two sums of a combine in one pass: row r of out = Σ_k g(rows_of[k]) over k ∈
/// [offsets[r], offsets[r+1]) in k order, where the group g(i) = Σ_l w[i·G+l] · *src[i·G+l] over
/// the G slots l whose src is not null, in l order (w = 1 when null). Rounds exactly as a
/// weighted `GatherSumRows` into groups followed by an unweighted one (bitwise equal); a target
/// without rows is 0. Works through the row in chunks of 64 values, each group's partial sum
/// on the stack.
template <class T>
struct GatherSumRowGroups {
  static constexpr std::int64_t kChunk = 64;
  std::int64_t const* offsets;  ///< [R + 1]
  std::int64_t const* rows_of;  ///< [N]
  T const* const* src;          ///< [N·G] row starts, null: empty slot
  T const* w;                   ///< [N·G] or null
  T* out;                       ///< [R, h]
  std::int64_t group, h;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    T* __restrict o = out + r * h;
    std::int64_t const b = offsets[r], e = offsets[r + 1];
    for (std::int64_t c0 = 0; c0 < h; c0 += kChunk) {
      std::int64_t const n = h - c0 < kChunk ? h - c0 : kChunk;
      if (b == e)
        for (std::int64_t c = 0; c < n; ++c) o[c0 + c] = T(0);
      for (std::int64_t k = b; k < e; ++k) {
        std::int64_t const i = rows_of[k];
        T g[kChunk];
        bool any = false;
        for (std::int64_t l = 0; l < group; ++l) {
          T const* s = src[i * group + l];
          if (!s) continue;
          s += c0;
          compute_t<T> const wi = w ? widen(w[i * group + l]) : compute_t<T>(1);
          if (!any)
            for (std::int64_t c = 0; c < n; ++c) g[c] = narrow<T>(wi * widen(s[c]));
          else
            for (std::int64_t c = 0; c < n; ++c) g[c] = narrow<T>(widen(g[c]) + wi * widen(s[c]));
          any = true;
        }
        if (!any)
          for (std::int64_t c = 0; c < n; ++c) g[c] = T(0);
        compute_t<T> const one(1);
        if (k == b)
          for (std::int64_t c = 0; c < n; ++c) o[c0 + c] = narrow<T>(one * widen(g[c]));
        else
          for (std::int64_t c = 0; c < n; ++c)
            o[c0 + c] = narrow<T>(widen(o[c0 + c]) + one * widen(g[c]));
      }
    }
  }
};

/// out[i] = ⟨a[target[i]], b[i]⟩ over h values, summed in order.
template <class T>
struct RowDots {
  std::int64_t const* target;
  T const* a;
  T const* b;
  T* out;
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    out[i] = detail::row_dot(a + target[i] * h, b + i * h, h);
  }
};

/// keys[i] = i mod E where map[i] ≠ none, else −1: the expert of each routing entry of a
/// `[T, E]` map, the key of the expert-major sort.
template <class M>
struct ExpertKeys {
  M const* map;
  M none;
  std::int64_t experts;
  std::int64_t* keys;
  MOEFOLD_HD void operator()(std::int64_t i) const { keys[i] = map[i] == none ? -1 : i % experts; }
};

/// out[j] = in[j] / d: the token of each sorted entry t·E + e.
struct DivideIndex {
  std::int64_t const* in;
  std::int64_t* out;
  std::int64_t d;
  MOEFOLD_HD void operator()(std::int64_t j) const { out[j] = in[j] / d; }
};

/// out[i] = in[idx[i]], or 0 where idx[i] < 0.
template <class T>
struct GatherOrZero {
  std::int64_t const* idx;
  T const* in;
  T* out;
  MOEFOLD_HD void operator()(std::int64_t i) const { out[i] = idx[i] >= 0 ? in[idx[i]] : T(0); }
};

/// out[idx[i]] = in[i] (or += with `add`), skipped where idx[i] < 0. The non-negative indices
/// must be distinct: each output has one writer.
template <class T>
struct Scatter {
  std::int64_t const* idx;
  T const* in;
  T* out;
  bool add;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const j = idx[i];
    if (j < 0) return;
    if (add)
      out[j] = narrow<T>(widen(out[j]) + widen(in[i]));
    else
      out[j] = in[i];
  }
};

/// out[i] = entry[i] where entry[i] ≥ 0 and map[entry[i]] = routed, else −1: the routed
/// entries among rows that may be padding or empty.
template <class M>
struct RoutedIndex {
  std::int64_t const* entry;
  M const* map;
  M routed;
  std::int64_t* out;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const e = entry[i];
    out[i] = e >= 0 && map[e] == routed ? e : -1;
  }
};

/// src[i] for output row i of a chunk sort: the output chunk c holding i (the last with
/// out_start[c] ≤ i, by binary search), then in_start[c] + (i − out_start[c]).
struct ChunkSources {
  std::int64_t const* out_start;  ///< [C + 1]
  std::int64_t const* in_start;   ///< [C]
  std::int64_t chunks;
  std::int64_t* src;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t lo = 0, hi = chunks;  // out_start[lo] ≤ i < out_start[hi]
    while (hi - lo > 1) {
      std::int64_t const mid = lo + (hi - lo) / 2;
      if (out_start[mid] <= i)
        lo = mid;
      else
        hi = mid;
    }
    src[i] = in_start[lo] + (i - out_start[lo]);
  }
};

namespace detail {
template <class T, class S>
void check_cols(View<T, S> const& v, std::int64_t h, char const* op, char const* what) {
  MOEFOLD_EXPECTS(v.contiguous() && v.cols() == h,
                  "ops::{}: {} is a {}×{} view, expected contiguous rows of {}", op, what, v.rows(),
                  v.cols(), h);
}
}  // namespace detail

/// out[i, ·] = in[src[i], ·], or w[i] · in[src[i], ·] when `w` is non-empty.
template <class Exec, class T>
void gather_rows(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> src,
                 View<T const, typename Exec::memory_space> in,
                 View<T, typename Exec::memory_space> out,
                 View<T const, typename Exec::memory_space> w = {}) {
  std::int64_t const h = out.cols();
  detail::check_cols(in, h, "gather_rows", "input");
  MOEFOLD_EXPECTS(out.contiguous() && out.rows() == src.size() && (w.empty() || w.size() == src.size()),
                  "ops::gather_rows: {} source rows and {} weights for {} output rows", src.size(),
                  w.size(), out.rows());
  if (w.empty()) {
    for_each_row(exec, out.rows(), GatherRows<T>{src.data(), in.data(), out.data(), out.rows(), h});
    detail::copy_rows_done();
  } else {
    for_each_row(exec, out.rows(), ScaledGatherRows<T>{src.data(), w.data(), in.data(), out.data(), h});
  }
}

/// out[r, ·] = Σ w[i] · rows[i, ·] over i = rows_of[offsets[r] .. offsets[r+1]) (w = 1 when
/// empty).
template <class Exec, class T>
void gather_sum_rows(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> offsets,
                     View<std::int64_t const, typename Exec::memory_space> rows_of,
                     View<T const, typename Exec::memory_space> w,
                     View<T const, typename Exec::memory_space> rows,
                     View<T, typename Exec::memory_space> out) {
  std::int64_t const h = out.cols();
  detail::check_cols(rows, h, "gather_sum_rows", "rows");
  MOEFOLD_EXPECTS(out.contiguous() && offsets.size() == out.rows() + 1 &&
                      rows_of.size() == rows.rows() && (w.empty() || w.size() == rows.rows()),
                  "ops::gather_sum_rows: {} offsets, {} row indices, {} weights and {} rows for "
                  "{} targets",
                  offsets.size(), rows_of.size(), w.size(), rows.rows(), out.rows());
  for_each_row(exec, out.rows(),
               GatherSumRows<T>{offsets.data(), rows_of.data(), w.empty() ? nullptr : w.data(),
                                rows.data(), out.data(), out.rows(), h});
}

/// out[i, ·] = *src[i] (w empty) or w[i] · *src[i], each source a row of h = out.cols() values.
template <class Exec, class T>
void gather_row_ptrs(Exec const& exec, T const* const* src, View<T const, typename Exec::memory_space> w,
                     View<T, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(out.contiguous() && (w.empty() || w.size() == out.rows()),
                  "ops::gather_row_ptrs: {} weights for {} output rows", w.size(), out.rows());
  for_each_row(exec, out.rows(),
               GatherRowPtrs<T>{src, w.empty() ? nullptr : w.data(), out.data(), out.rows(), out.cols()});
  if (w.empty()) detail::copy_rows_done();
}

/// out[i] = ⟨*a[i], b[i, ·]⟩.
template <class Exec, class T>
void row_dot_ptrs(Exec const& exec, T const* const* a, View<T const, typename Exec::memory_space> b,
                  View<T, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(b.contiguous() && out.size() == b.rows(),
                  "ops::row_dot_ptrs: {} outputs for {} rows", out.size(), b.rows());
  for_each_row(exec, b.rows(), RowDotPtrs<T>{a, b.data(), out.data(), b.cols()});
}

/// out[r, ·] = Σ_i Σ_l w[i·G+l] · *src[i·G+l] (see `GatherSumRowGroups`), src and w [N·G].
template <class Exec, class T>
void gather_sum_row_groups(Exec const& exec,
                           View<std::int64_t const, typename Exec::memory_space> offsets,
                           View<std::int64_t const, typename Exec::memory_space> rows_of,
                           T const* const* src, std::int64_t group,
                           View<T const, typename Exec::memory_space> w,
                           View<T, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(out.contiguous() && offsets.size() == out.rows() + 1 && group >= 1 &&
                      (w.empty() || w.size() == rows_of.size() * group),
                  "ops::gather_sum_row_groups: {} offsets, {} rows of {} slots, {} weights for {} "
                  "targets",
                  offsets.size(), rows_of.size(), group, w.size(), out.rows());
  for_each_row(exec, out.rows(),
               GatherSumRowGroups<T>{offsets.data(), rows_of.data(), src,
                                     w.empty() ? nullptr : w.data(), out.data(), group, out.cols()});
}

/// out[i] = ⟨a[target[i], ·], b[i, ·]⟩.
template <class Exec, class T>
void row_dots(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> target,
              View<T const, typename Exec::memory_space> a,
              View<T const, typename Exec::memory_space> b, View<T, typename Exec::memory_space> out) {
  std::int64_t const h = b.cols();
  detail::check_cols(a, h, "row_dots", "a");
  MOEFOLD_EXPECTS(b.contiguous() && target.size() == b.rows() && out.size() == b.rows(),
                  "ops::row_dots: {} targets and {} outputs for {} rows", target.size(),
                  out.size(), b.rows());
  for_each_row(exec, b.rows(), RowDots<T>{target.data(), a.data(), b.data(), out.data(), h});
}

/// out[i] = in[idx[i]] (0 where idx[i] < 0).
template <class Exec, class T>
void gather_or_zero(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> idx,
                    View<T const, typename Exec::memory_space> in,
                    View<T, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(idx.size() == out.size() && out.contiguous() && idx.contiguous(),
                  "ops::gather_or_zero: {} indices for {} outputs", idx.size(), out.size());
  for_each(exec, out.size(), GatherOrZero<T>{idx.data(), in.data(), out.data()});
}

/// out[idx[i]] = in[i] (+= when `add`), skipping idx[i] < 0; indices ≥ 0 must be distinct.
template <class Exec, class T>
void scatter(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> idx,
             View<T const, typename Exec::memory_space> in, View<T, typename Exec::memory_space> out,
             bool add) {
  MOEFOLD_EXPECTS(idx.size() == in.size() && in.contiguous() && idx.contiguous(),
                  "ops::scatter: {} indices for {} inputs", idx.size(), in.size());
  for_each(exec, in.size(), Scatter<T>{idx.data(), in.data(), out.data(), add});
}

/// out[i] = entry[i] if that entry of `map` is `routed`, else −1.
template <class Exec, class M>
void routed_index(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> entry,
                  View<M const, typename Exec::memory_space> map, M routed,
                  View<std::int64_t, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(entry.size() == out.size(), "ops::routed_index: {} entries for {} outputs",
                  entry.size(), out.size());
  for_each(exec, out.size(), RoutedIndex<M>{entry.data(), map.data(), routed, out.data()});
}

/// keys[i] = i mod E, or −1 where map[i] = none.
template <class Exec, class M>
void expert_keys(Exec const& exec, View<M const, typename Exec::memory_space> map, M none,
                 std::int64_t experts, View<std::int64_t, typename Exec::memory_space> keys) {
  MOEFOLD_EXPECTS(map.size() == keys.size() && experts > 0,
                  "ops::expert_keys: {} map entries for {} keys over {} experts", map.size(),
                  keys.size(), experts);
  for_each(exec, keys.size(), ExpertKeys<M>{map.data(), none, experts, keys.data()});
}

/// out[j] = in[j] / d.
template <class Exec>
void divide_index(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> in,
                  std::int64_t d, View<std::int64_t, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(in.size() == out.size() && d > 0, "ops::divide_index: {} inputs, {} outputs, d = {}",
                  in.size(), out.size(), d);
  for_each(exec, out.size(), DivideIndex{in.data(), out.data(), d});
}

/// src [N]: each output row's input row for output chunks starting at out_start [C + 1] (the
/// last entry is N) and reading from in_start [C].
template <class Exec>
void chunk_sources(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> out_start,
                   View<std::int64_t const, typename Exec::memory_space> in_start,
                   View<std::int64_t, typename Exec::memory_space> src) {
  MOEFOLD_EXPECTS(out_start.size() == in_start.size() + 1 && src.contiguous(),
                  "ops::chunk_sources: {} chunk starts for {} chunks", out_start.size(),
                  in_start.size());
  for_each(exec, src.size(), ChunkSources{out_start.data(), in_start.data(), in_start.size(), src.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
