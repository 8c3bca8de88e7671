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
#include <concepts>
#include <cstdint>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/ops/permute.hpp"

namespace moefold {
inline namespace v0 {

/// A many-to-one map from N rows to R targets: row i belongs to target `target(i)`. It keeps the
/// inverse (targets' rows in ascending row order) so that reductions are gathers: each target
/// row is written once, in a deterministic order. Host metadata (the index arrays live in host
/// memory).
class RowMap {
 public:
  RowMap() = default;
  /// Row i belongs to target `row_target[i]` ∈ [0, num_targets).
  RowMap(std::vector<std::int64_t> row_target, std::int64_t num_targets)
      : RowMap(Cpu{}, std::move(row_target), num_targets) {}
  /// The inverse by `histogram`, `exclusive_scan` and `stable_sort_by_key` of `exec`.
  template <HostInstance Exec>
  RowMap(Exec const& exec, std::vector<std::int64_t> row_target, std::int64_t num_targets)
      : row_target_(std::move(row_target)), offsets_(num_targets + 1) {
    MOEFOLD_EXPECTS(num_targets >= 0, "RowMap: negative target count {}", num_targets);
    for (auto t : row_target_)
      MOEFOLD_EXPECTS(t >= 0 && t < num_targets, "RowMap: target {} outside [0, {})", t,
                      num_targets);
    View<std::int64_t const> const keys(row_target_);
    histogram<std::int64_t>(exec, keys, offsets_.view().cols(0, num_targets));
    offsets_[static_cast<std::size_t>(num_targets)] = 0;
    exclusive_scan<std::int64_t>(exec, offsets_.view(), offsets_.view());
    target_rows_ = Buffer<std::int64_t>(rows());
    stable_sort_by_key<std::int64_t>(exec, keys, num_targets, target_rows_.view());
  }

  std::int64_t rows() const noexcept { return static_cast<std::int64_t>(row_target_.size()); }
  std::int64_t targets() const noexcept { return static_cast<std::int64_t>(offsets_.size()) - 1; }
  std::int64_t target(std::int64_t row) const { return row_target_[static_cast<std::size_t>(row)]; }
  std::span<std::int64_t const> row_targets() const noexcept { return row_target_; }
  /// The rows of target `t`, ascending.
  std::span<std::int64_t const> rows_of(std::int64_t t) const {
    auto const b = offsets_[static_cast<std::size_t>(t)],
               e = offsets_[static_cast<std::size_t>(t) + 1];
    return std::span<std::int64_t const>(target_rows_.data() + b, static_cast<std::size_t>(e - b));
  }
  /// Each target's first row in `target_rows()` `[R + 1]`.
  View<std::int64_t const> offsets() const noexcept { return offsets_.view(); }
  /// The rows of every target, target by target `[N]`.
  View<std::int64_t const> target_rows() const noexcept { return target_rows_.view(); }

 private:
  std::vector<std::int64_t> row_target_;
  Buffer<std::int64_t> offsets_;  // [R + 1]
  Buffer<std::int64_t> target_rows_;
};

namespace detail {
template <class Real>
void check_rows(View<Real const> a, std::int64_t rows, std::int64_t h, char const* what) {
  MOEFOLD_EXPECTS(a.size() == rows * h, "{}: expected {} rows × {} = {} elements, got {}", what,
                  rows, h, rows * h, a.size());
}
}  // namespace detail

/// out[i] = w[i] · src[map.target(i)] (w = 1 when `weights` is empty): `src` is `[R, H]`, `out`
/// `[N, H]`.
template <class Real, HostInstance Exec>
void permute(Exec const& exec, RowMap const& map, std::type_identity_t<View<Real const>> src,
             std::type_identity_t<View<Real>> out, std::int64_t h,
             std::type_identity_t<View<Real const>> weights = {}) {
  detail::check_rows<Real>(src, map.targets(), h, "permute: source");
  detail::check_rows<Real>(out, map.rows(), h, "permute: output");
  ops::gather_rows<Exec, Real>(exec, View<std::int64_t const>(map.row_targets()),
                               src.reshaped(map.targets(), h), out.reshaped(map.rows(), h), weights);
}

/// out[r] = Σ_{i: map.target(i) = r} w[i] · rows[i] (rows summed in ascending order; targets
/// with no row become 0): `rows` is `[N, H]`, `out` `[R, H]`.
template <class Real, HostInstance Exec>
void unpermute(Exec const& exec, RowMap const& map, std::type_identity_t<View<Real const>> rows,
               std::type_identity_t<View<Real>> out, std::int64_t h,
               std::type_identity_t<View<Real const>> weights = {}) {
  detail::check_rows<Real>(rows, map.rows(), h, "unpermute: rows");
  detail::check_rows<Real>(out, map.targets(), h, "unpermute: output");
  ops::gather_sum_rows<Exec, Real>(exec, map.offsets(), map.target_rows(), weights,
                                   rows.reshaped(map.rows(), h), out.reshaped(map.targets(), h));
}

/// out[i] = ⟨a[map.target(i)], b[i]⟩: the gradient of a weighted `unpermute` with respect to
/// its weights (`a` = output gradient `[R, H]`, `b` = the rows `[N, H]`).
template <class Real, HostInstance Exec>
void row_dots(Exec const& exec, RowMap const& map, std::type_identity_t<View<Real const>> a,
              std::type_identity_t<View<Real const>> b, std::type_identity_t<View<Real>> out,
              std::int64_t h) {
  detail::check_rows<Real>(a, map.targets(), h, "row_dots: a");
  detail::check_rows<Real>(b, map.rows(), h, "row_dots: b");
  MOEFOLD_EXPECTS(out.size() == map.rows(), "row_dots: {} outputs for {} rows", out.size(),
                  map.rows());
  ops::row_dots<Exec, Real>(exec, View<std::int64_t const>(map.row_targets()),
                            a.reshaped(map.targets(), h), b.reshaped(map.rows(), h), out);
}

/// The stable expert-major order of a routing's entries (spec §2.3 `permute`): the entries whose
/// map is not `none`, by (expert ascending, token ascending). `tokens` maps each row to its
/// token; `entry[i] = t·E + e` names the routing entry of row i.
struct ExpertMajorOrder {
  RowMap tokens;
  std::vector<std::int64_t> entry;              ///< [N]
  std::vector<std::int64_t> tokens_per_expert;  ///< [E]

  /// The order by `stable_sort_by_key` over the entries' experts (key −1 for `none`).
  template <class Real, HostInstance Exec>
  static ExpertMajorOrder of(Exec const& exec, Routing<Real> const& r) {
    r.check_shape("expert-major permutation");
    ExpertMajorOrder o;
    std::int64_t const E = r.num_experts;
    Buffer<std::int64_t> keys(static_cast<std::int64_t>(r.map.size()));
    ops::expert_keys<Exec, Route>(exec, View<Route const>(r.map), Route::none, E, keys.view());
    o.tokens_per_expert.assign(static_cast<std::size_t>(E), 0);
    histogram<std::int64_t>(exec, keys.view(), View<std::int64_t>(o.tokens_per_expert));
    o.entry.resize(static_cast<std::size_t>(
        std::accumulate(o.tokens_per_expert.begin(), o.tokens_per_expert.end(), std::int64_t{0})));
    stable_sort_by_key<std::int64_t>(exec, keys.view(), E, View<std::int64_t>(o.entry));
    std::vector<std::int64_t> token(o.entry.size());
    ops::divide_index<Exec>(exec, View<std::int64_t const>(o.entry), E, View<std::int64_t>(token));
    o.tokens = RowMap(exec, std::move(token), r.num_tokens);
    return o;
  }
  template <class Real>
  static ExpertMajorOrder of(Routing<Real> const& r) {
    return of(Cpu{}, r);
  }

  /// The probabilities of the rows, `[N]` (0 for padding entries).
  template <class Real, HostInstance Exec>
  Buffer<Real> probs(Exec const& exec, Routing<Real> const& r) const {
    auto const n = static_cast<std::int64_t>(entry.size());
    Buffer<std::int64_t> at(n);
    ops::routed_index<Exec, Route>(exec, View<std::int64_t const>(entry),
                                   View<Route const>(r.map), Route::routed, at.view());
    Buffer<Real> p(n);
    ops::gather_or_zero<Exec, Real>(exec, at.view(), View<Real const>(r.probs), p.view());
    return p;
  }
  template <class Real>
  std::vector<Real> probs(Routing<Real> const& r) const {
    return probs(Cpu{}, r);
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
template <class Real, HostInstance Exec>
void gather_rows(Exec const& exec, std::span<std::int64_t const> src,
                 std::type_identity_t<View<Real const>> in, std::type_identity_t<View<Real>> out,
                 std::int64_t h) {
  auto const n = static_cast<std::int64_t>(src.size());
  MOEFOLD_EXPECTS(out.size() == n * h && in.size() == out.size(),
                  "gather_rows: {} rows of {} for buffers of {} and {}", n, h, in.size(),
                  out.size());
  ops::gather_rows<Exec, Real>(exec, View<std::int64_t const>(src), in.reshaped(n, h),
                               out.reshaped(n, h));
}

}  // namespace v0
}  // namespace moefold
