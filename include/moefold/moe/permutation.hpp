#pragma once
/// \file
/// Permutation primitives (spec §2.3): `RowMap` (rows → source/target rows, with its inverse),
/// `permute` (gather rows, optionally scaled), `unpermute` (sum rows back into their targets,
/// optionally probability-weighted), the stable expert-major permutation of a routing, and the
/// chunk sort by local expert with its inverse. Rows are contiguous `[·, H]` row-major; moving a
/// row is one `memcpy`.
///
/// Forward/backward pairs: the backward of `permute` is `unpermute` with the same map and
/// weights; the backward of a weighted `unpermute` is a weighted `permute` for the rows and
/// `row_dots` for the weights.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "moefold/core/error.hpp"
#include "moefold/moe/routing.hpp"

namespace moefold {
inline namespace v0 {

/// A many-to-one map from N rows to R targets: row i belongs to target `target(i)`. It keeps the
/// inverse (targets' rows in ascending row order) so that reductions are gathers: each target
/// row is written once, in a deterministic order.
class RowMap {
 public:
  RowMap() = default;
  /// Row i belongs to target `row_target[i]` ∈ [0, num_targets).
  RowMap(std::vector<std::int64_t> row_target, std::int64_t num_targets)
      : row_target_(std::move(row_target)), offsets_(static_cast<std::size_t>(num_targets) + 1, 0) {
    MOEFOLD_EXPECTS(num_targets >= 0, "RowMap: negative target count {}", num_targets);
    for (auto t : row_target_) {
      MOEFOLD_EXPECTS(t >= 0 && t < num_targets, "RowMap: target {} outside [0, {})", t,
                      num_targets);
      ++offsets_[static_cast<std::size_t>(t) + 1];
    }
    std::partial_sum(offsets_.begin(), offsets_.end(), offsets_.begin());
    target_rows_.resize(row_target_.size());
    std::vector<std::int64_t> next(offsets_.begin(), offsets_.end() - 1);
    for (std::size_t i = 0; i < row_target_.size(); ++i)
      target_rows_[static_cast<std::size_t>(next[static_cast<std::size_t>(row_target_[i])]++)] =
          static_cast<std::int64_t>(i);
  }

  std::int64_t rows() const noexcept { return static_cast<std::int64_t>(row_target_.size()); }
  std::int64_t targets() const noexcept { return static_cast<std::int64_t>(offsets_.size()) - 1; }
  std::int64_t target(std::int64_t row) const { return row_target_[static_cast<std::size_t>(row)]; }
  std::span<std::int64_t const> row_targets() const noexcept { return row_target_; }
  /// The rows of target `t`, ascending.
  std::span<std::int64_t const> rows_of(std::int64_t t) const {
    auto const b = offsets_[static_cast<std::size_t>(t)],
               e = offsets_[static_cast<std::size_t>(t) + 1];
    return std::span<std::int64_t const>(target_rows_)
        .subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(e - b));
  }

 private:
  std::vector<std::int64_t> row_target_;
  std::vector<std::int64_t> offsets_;  // [R + 1]
  std::vector<std::int64_t> target_rows_;
};

namespace detail {
/// Copies one row; large rows use non-temporal stores (the permuted buffer is written once and
/// read much later, so caching it only evicts the source).
/// `next` (the following source row, may be null) is prefetched along the way: rows are a page
/// each at typical H, where the hardware prefetcher stops.
template <class Real>
inline void copy_row(Real* __restrict dst, Real const* __restrict src, std::size_t n,
                     Real const* next = nullptr) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<Real, float>) {
    if (n >= 256 && n % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0) {
      for (std::size_t c = 0; c < n; c += 16) {
        if (next) __builtin_prefetch(next + c);
        _mm_stream_ps(dst + c, _mm_loadu_ps(src + c));
        _mm_stream_ps(dst + c + 4, _mm_loadu_ps(src + c + 4));
        _mm_stream_ps(dst + c + 8, _mm_loadu_ps(src + c + 8));
        _mm_stream_ps(dst + c + 12, _mm_loadu_ps(src + c + 12));
      }
      return;
    }
  } else if constexpr (std::is_same_v<Real, double>) {
    if (n >= 128 && n % 2 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0) {
      for (std::size_t c = 0; c < n; c += 2) _mm_stream_pd(dst + c, _mm_loadu_pd(src + c));
      return;
    }
  }
#endif
  std::memcpy(dst, src, n * sizeof(Real));
}
/// Orders the non-temporal stores of `copy_row` before later loads by other threads.
inline void copy_rows_done() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <class Real>
void check_rows(std::span<Real const> a, std::int64_t rows, std::int64_t h, char const* what) {
  MOEFOLD_EXPECTS(a.size() == static_cast<std::size_t>(rows * h),
                  "{}: expected {} rows × {} = {} elements, got {}", what, rows, h, rows * h,
                  a.size());
}
}  // namespace detail

/// out[i] = w[i] · src[map.target(i)] (w = 1 when `weights` is empty): `src` is `[R, H]`, `out`
/// `[N, H]`.
template <class Real>
void permute(RowMap const& map, std::span<Real const> src, std::span<Real> out, std::int64_t h,
             std::span<Real const> weights = {}) {
  detail::check_rows<Real>(src, map.targets(), h, "permute: source");
  detail::check_rows<Real>(out, map.rows(), h, "permute: output");
  auto const hs = static_cast<std::size_t>(h);
  for (std::int64_t i = 0; i < map.rows(); ++i) {
    Real const* s = src.data() + static_cast<std::size_t>(map.target(i)) * hs;
    Real* o = out.data() + static_cast<std::size_t>(i) * hs;
    if (weights.empty()) {
      Real const* next = i + 1 < map.rows()
                             ? src.data() + static_cast<std::size_t>(map.target(i + 1)) * hs
                             : nullptr;
      detail::copy_row(o, s, hs, next);
    } else {
      Real const w = weights[static_cast<std::size_t>(i)];
      for (std::size_t c = 0; c < hs; ++c) o[c] = w * s[c];
    }
  }
  if (weights.empty()) detail::copy_rows_done();
}

/// out[r] = Σ_{i: map.target(i) = r} w[i] · rows[i] (rows summed in ascending order; targets
/// with no row become 0): `rows` is `[N, H]`, `out` `[R, H]`.
template <class Real>
void unpermute(RowMap const& map, std::span<Real const> rows, std::span<Real> out, std::int64_t h,
               std::span<Real const> weights = {}) {
  detail::check_rows<Real>(rows, map.rows(), h, "unpermute: rows");
  detail::check_rows<Real>(out, map.targets(), h, "unpermute: output");
  auto const hs = static_cast<std::size_t>(h);
  for (std::int64_t r = 0; r < map.targets(); ++r) {
    Real* __restrict o = out.data() + static_cast<std::size_t>(r) * hs;
    auto const idx = map.rows_of(r);
    if (idx.empty()) {
      std::fill_n(o, hs, Real(0));
      continue;
    }
    bool first = true;
    auto const next = r + 1 < map.targets() ? map.rows_of(r + 1) : std::span<std::int64_t const>{};
    std::size_t k = 0;
    for (auto i : idx) {
      Real const* __restrict s = rows.data() + static_cast<std::size_t>(i) * hs;
      if (k < next.size()) {  // the next target's k-th row, a cache line per 16 bytes × 4
        Real const* pf = rows.data() + static_cast<std::size_t>(next[k]) * hs;
        for (std::size_t c = 0; c < hs; c += 64 / sizeof(Real)) __builtin_prefetch(pf + c);
      }
      ++k;
      Real const w = weights.empty() ? Real(1) : weights[static_cast<std::size_t>(i)];
      if (first)
        for (std::size_t c = 0; c < hs; ++c) o[c] = w * s[c];
      else
        for (std::size_t c = 0; c < hs; ++c) o[c] += w * s[c];
      first = false;
    }
  }
}

/// out[i] = ⟨a[map.target(i)], b[i]⟩: the gradient of a weighted `unpermute` with respect to
/// its weights (`a` = output gradient `[R, H]`, `b` = the rows `[N, H]`).
template <class Real>
void row_dots(RowMap const& map, std::span<Real const> a, std::span<Real const> b,
              std::span<Real> out, std::int64_t h) {
  detail::check_rows<Real>(a, map.targets(), h, "row_dots: a");
  detail::check_rows<Real>(b, map.rows(), h, "row_dots: b");
  MOEFOLD_EXPECTS(out.size() == static_cast<std::size_t>(map.rows()),
                  "row_dots: {} outputs for {} rows", out.size(), map.rows());
  auto const hs = static_cast<std::size_t>(h);
  for (std::int64_t i = 0; i < map.rows(); ++i) {
    Real const* x = a.data() + static_cast<std::size_t>(map.target(i)) * hs;
    Real const* y = b.data() + static_cast<std::size_t>(i) * hs;
    Real s = 0;
    for (std::size_t c = 0; c < hs; ++c) s += x[c] * y[c];
    out[static_cast<std::size_t>(i)] = s;
  }
}

/// The stable expert-major order of a routing's entries (spec §2.3 `permute`): the entries whose
/// map is not `none`, by (expert ascending, token ascending). `tokens` maps each row to its
/// token; `entry[i] = t·E + e` names the routing entry of row i.
struct ExpertMajorOrder {
  RowMap tokens;
  std::vector<std::int64_t> entry;              ///< [N]
  std::vector<std::int64_t> tokens_per_expert;  ///< [E]

  template <class Real>
  static ExpertMajorOrder of(Routing<Real> const& r) {
    r.check_shape("expert-major permutation");
    ExpertMajorOrder o;
    o.tokens_per_expert = r.tokens_per_expert();
    auto const e_count = static_cast<std::size_t>(r.num_experts);
    std::vector<std::int64_t> next(e_count, 0);
    std::exclusive_scan(o.tokens_per_expert.begin(), o.tokens_per_expert.end(), next.begin(),
                        std::int64_t{0});
    auto const n = static_cast<std::size_t>(
        std::accumulate(o.tokens_per_expert.begin(), o.tokens_per_expert.end(), std::int64_t{0}));
    std::vector<std::int64_t> token(n);
    o.entry.resize(n);
    for (std::int64_t t = 0; t < r.num_tokens; ++t)
      for (std::size_t e = 0; e < e_count; ++e) {
        auto const i = static_cast<std::size_t>(t) * e_count + e;
        if (r.map[i] == Route::none) continue;
        auto const row = static_cast<std::size_t>(next[e]++);
        token[row] = t;
        o.entry[row] = static_cast<std::int64_t>(i);
      }
    o.tokens = RowMap(std::move(token), r.num_tokens);
    return o;
  }

  /// The probabilities of the rows, `[N]` (0 for padding entries).
  template <class Real>
  std::vector<Real> probs(Routing<Real> const& r) const {
    std::vector<Real> p(entry.size());
    for (std::size_t i = 0; i < entry.size(); ++i) {
      auto const at = static_cast<std::size_t>(entry[i]);
      p[i] = r.map[at] == Route::routed ? r.probs[at] : Real(0);
    }
    return p;
  }
};

/// `sort_chunks_by_idxs` as an index map (spec §2.3): cut rows into consecutive chunks of
/// `split_sizes`, then concatenate chunks `order[0], order[1], …`. Returns, for each output row,
/// its input row.
inline std::vector<std::int64_t> sort_chunks(std::span<std::int64_t const> split_sizes,
                                             std::span<std::int64_t const> order) {
  MOEFOLD_EXPECTS(order.size() == split_sizes.size(), "sort_chunks: {} chunk indices for {} chunks",
                  order.size(), split_sizes.size());
  std::vector<std::int64_t> start(split_sizes.size(), 0);
  std::exclusive_scan(split_sizes.begin(), split_sizes.end(), start.begin(), std::int64_t{0});
  std::vector<std::int64_t> src;
  for (auto c : order) {
    MOEFOLD_EXPECTS(c >= 0 && static_cast<std::size_t>(c) < split_sizes.size(),
                    "sort_chunks: chunk {} outside [0, {})", c, split_sizes.size());
    for (std::int64_t k = 0; k < split_sizes[static_cast<std::size_t>(c)]; ++k)
      src.push_back(start[static_cast<std::size_t>(c)] + k);
  }
  return src;
}

/// Megatron's fixed chunk orders for `rows` × `cols` chunks: `transpose_order(rows, cols)[i]`
/// views chunk ids as `[rows, cols]`, transposes and flattens. `sort_in` is
/// `transpose_order(ETP·EP, L)` (local expert major, source minor); `restore_out` is
/// `transpose_order(L, ETP·EP)`, its inverse.
inline std::vector<std::int64_t> transpose_order(std::int64_t rows, std::int64_t cols) {
  std::vector<std::int64_t> o;
  o.reserve(static_cast<std::size_t>(rows * cols));
  for (std::int64_t c = 0; c < cols; ++c)
    for (std::int64_t r = 0; r < rows; ++r) o.push_back(r * cols + c);
  return o;
}

/// Moves rows `[·, H]` by an index map from `sort_chunks`: out[i] = in[src[i]].
template <class Real>
void gather_rows(std::span<std::int64_t const> src, std::span<Real const> in, std::span<Real> out,
                 std::int64_t h) {
  auto const hs = static_cast<std::size_t>(h);
  MOEFOLD_EXPECTS(out.size() == src.size() * hs && in.size() == out.size(),
                  "gather_rows: {} rows of {} for buffers of {} and {}", src.size(), h, in.size(),
                  out.size());
  for (std::size_t i = 0; i < src.size(); ++i)
    std::memcpy(out.data() + i * hs, in.data() + static_cast<std::size_t>(src[i]) * hs,
                hs * sizeof(Real));
}

}  // namespace v0
}  // namespace moefold
