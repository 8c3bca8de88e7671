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
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/moe/routing.hpp"
#include "moefold/ops/permute.hpp"

namespace moefold {
inline namespace v0 {

/// A many-to-one map from N rows to R targets: row i belongs to target `target(i)`. It keeps the
/// inverse (targets' rows in ascending row order) so that reductions are gathers: each target
/// row is written once, in a deterministic order. The index arrays live in `Space` (the memory
/// of the instance that built them); the sizes N and R are host values.
template <MemorySpace Space>
class RowMapIn {
 public:
  RowMapIn() = default;
  /// Row i belongs to target `row_target[i]` ∈ [0, num_targets) (checked).
  RowMapIn(std::vector<std::int64_t> row_target, std::int64_t num_targets)
    requires(Space::host_accessible)
      : RowMapIn(Cpu{}, std::move(row_target), num_targets) {}
  /// The inverse by `histogram`, `exclusive_scan` and `stable_sort_by_key` of `exec`. Host
  /// maps check every target; a device map's targets must be in range (the dispatchers build
  /// them so).
  template <ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  RowMapIn(Exec const& exec, Buffer<std::int64_t, Space> row_target, std::int64_t num_targets)
      : row_target_(std::move(row_target)),
        offsets_(exec.template allocate<std::int64_t>(num_targets + 1)),
        target_rows_(exec.template allocate<std::int64_t>(static_cast<std::int64_t>(row_target_.size()))) {
    MOEFOLD_EXPECTS(num_targets >= 0, "RowMap: negative target count {}", num_targets);
    if constexpr (Space::host_accessible)
      for (auto t : row_target_)
        MOEFOLD_EXPECTS(t >= 0 && t < num_targets, "RowMap: target {} outside [0, {})", t,
                        num_targets);
    View<std::int64_t const, Space> const keys = row_target_.view();
    histogram<std::int64_t>(exec, keys, offsets_.view().cols(0, num_targets));
    ops::fill(exec, offsets_.view().cols(num_targets, 1), std::int64_t{0});
    exclusive_scan<std::int64_t>(exec, offsets_.view(), offsets_.view());
    stable_sort_by_key<std::int64_t>(exec, keys, num_targets, target_rows_.view());
  }

  std::int64_t rows() const noexcept { return static_cast<std::int64_t>(row_target_.size()); }
  std::int64_t targets() const noexcept { return static_cast<std::int64_t>(offsets_.size()) - 1; }
  /// Each row's target `[N]`.
  View<std::int64_t const, Space> row_targets() const noexcept { return row_target_.view(); }
  /// Each target's first row in `target_rows()` `[R + 1]`.
  View<std::int64_t const, Space> offsets() const noexcept { return offsets_.view(); }
  /// The rows of every target, target by target `[N]`.
  View<std::int64_t const, Space> target_rows() const noexcept { return target_rows_.view(); }

  /// Host maps: the target of `row`.
  std::int64_t target(std::int64_t row) const
    requires(Space::host_accessible)
  {
    return row_target_[static_cast<std::size_t>(row)];
  }
  /// Host maps: the rows of target `t`, ascending.
  std::span<std::int64_t const> rows_of(std::int64_t t) const
    requires(Space::host_accessible)
  {
    auto const b = offsets_[static_cast<std::size_t>(t)],
               e = offsets_[static_cast<std::size_t>(t) + 1];
    return std::span<std::int64_t const>(target_rows_.data() + b, static_cast<std::size_t>(e - b));
  }

 private:
  Buffer<std::int64_t, Space> row_target_;  // [N]
  Buffer<std::int64_t, Space> offsets_;     // [R + 1]
  Buffer<std::int64_t, Space> target_rows_;  // [N]
};
/// A row map in host memory.
using RowMap = RowMapIn<HostSpace>;

namespace detail {
template <class V>
void check_rows(V const& a, std::int64_t rows, std::int64_t h, char const* what) {
  MOEFOLD_EXPECTS(a.size() == rows * h, "{}: expected {} rows × {} = {} elements, got {}", what,
                  rows, h, rows * h, a.size());
}
}  // namespace detail

/// out[i] = w[i] · src[map.target(i)] (w = 1 when `weights` is empty): `src` is `[R, H]`, `out`
/// `[N, H]`.
template <class Real, ExecutionInstance Exec>
void permute(Exec const& exec, RowMapIn<typename Exec::memory_space> const& map,
             std::type_identity_t<View<Real const, typename Exec::memory_space>> src,
             std::type_identity_t<View<Real, typename Exec::memory_space>> out, std::int64_t h,
             std::type_identity_t<View<Real const, typename Exec::memory_space>> weights = {}) {
  detail::check_rows(src, map.targets(), h, "permute: source");
  detail::check_rows(out, map.rows(), h, "permute: output");
  ops::gather_rows<Exec, Real>(exec, map.row_targets(), src.reshaped(map.targets(), h),
                               out.reshaped(map.rows(), h), weights);
}

/// out[r] = Σ_{i: map.target(i) = r} w[i] · rows[i] (rows summed in ascending order; targets
/// with no row become 0): `rows` is `[N, H]`, `out` `[R, H]`.
template <class Real, ExecutionInstance Exec>
void unpermute(Exec const& exec, RowMapIn<typename Exec::memory_space> const& map,
               std::type_identity_t<View<Real const, typename Exec::memory_space>> rows,
               std::type_identity_t<View<Real, typename Exec::memory_space>> out, std::int64_t h,
               std::type_identity_t<View<Real const, typename Exec::memory_space>> weights = {}) {
  detail::check_rows(rows, map.rows(), h, "unpermute: rows");
  detail::check_rows(out, map.targets(), h, "unpermute: output");
  ops::gather_sum_rows<Exec, Real>(exec, map.offsets(), map.target_rows(), weights,
                                   rows.reshaped(map.rows(), h), out.reshaped(map.targets(), h));
}

/// out[i] = ⟨a[map.target(i)], b[i]⟩: the gradient of a weighted `unpermute` with respect to
/// its weights (`a` = output gradient `[R, H]`, `b` = the rows `[N, H]`).
template <class Real, ExecutionInstance Exec>
void row_dots(Exec const& exec, RowMapIn<typename Exec::memory_space> const& map,
              std::type_identity_t<View<Real const, typename Exec::memory_space>> a,
              std::type_identity_t<View<Real const, typename Exec::memory_space>> b,
              std::type_identity_t<View<Real, typename Exec::memory_space>> out, std::int64_t h) {
  detail::check_rows(a, map.targets(), h, "row_dots: a");
  detail::check_rows(b, map.rows(), h, "row_dots: b");
  MOEFOLD_EXPECTS(out.size() == map.rows(), "row_dots: {} outputs for {} rows", out.size(),
                  map.rows());
  ops::row_dots<Exec, Real>(exec, map.row_targets(), a.reshaped(map.targets(), h),
                            b.reshaped(map.rows(), h), out);
}

/// The stable expert-major order of a routing's entries (spec §2.3 `permute`): the entries whose
/// map is not `none`, by (expert ascending, token ascending). `tokens` maps each row to its
/// token; `entry[i] = t·E + e` names the routing entry of row i. Index arrays in `Space`; the
/// counts per expert are host metadata.
template <MemorySpace Space>
struct ExpertMajorOrderIn {
  RowMapIn<Space> tokens;
  Buffer<std::int64_t, Space> entry;            ///< [N]
  std::vector<std::int64_t> tokens_per_expert;  ///< [E] (host)

  /// keys[i] = the expert of routing entry i, −1 for `none` `[T·E]`: the sort key, and what a
  /// histogram turns into the counts per expert.
  template <class Real, ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  static void keys(Exec const& exec, Routing<Real, Space> const& r, View<std::int64_t, Space> keys) {
    r.check_shape("expert-major permutation");
    ops::expert_keys<Exec, Route>(exec, r.map.view(), Route::none, r.num_experts, keys);
  }
  /// The order from the keys of `keys` and their histogram `counts` (already on the host): by
  /// `stable_sort_by_key` over the entries' experts.
  template <ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  static ExpertMajorOrderIn from_keys(Exec const& exec, View<std::int64_t const, Space> keys,
                                      std::vector<std::int64_t> counts, std::int64_t num_tokens) {
    ExpertMajorOrderIn o;
    auto const E = static_cast<std::int64_t>(counts.size());
    o.tokens_per_expert = std::move(counts);
    auto const n = std::accumulate(o.tokens_per_expert.begin(), o.tokens_per_expert.end(),
                                   std::int64_t{0});
    o.entry = exec.template allocate<std::int64_t>(n);
    stable_sort_by_key<std::int64_t>(exec, keys, E, o.entry.view());
    auto token = exec.template allocate<std::int64_t>(n);
    ops::divide_index<Exec>(exec, o.entry.view(), E, token.view());
    o.tokens = RowMapIn<Space>(exec, std::move(token), num_tokens);
    return o;
  }
  /// The order of `r`, its counts per expert copied to the host (one copy of E values).
  template <class Real, ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  static ExpertMajorOrderIn of(Exec const& exec, Routing<Real, Space> const& r) {
    auto k = exec.template allocate<std::int64_t>(static_cast<std::int64_t>(r.map.size()));
    keys(exec, r, k.view());
    auto counts = exec.template allocate<std::int64_t>(r.num_experts);
    histogram<std::int64_t>(exec, View<std::int64_t const, Space>(k.view()), counts.view());
    std::vector<std::int64_t> host(static_cast<std::size_t>(r.num_experts));
    copy<std::int64_t>(exec, View<std::int64_t const, Space>(counts.view()), View<std::int64_t>(host));
    return from_keys(exec, View<std::int64_t const, Space>(k.view()), std::move(host), r.num_tokens);
  }
  template <class Real>
  static ExpertMajorOrderIn of(Routing<Real> const& r)
    requires(Space::host_accessible)
  {
    return of(Cpu{}, r);
  }

  /// The probabilities of the rows, `[N]` (0 for padding entries).
  template <class Real, ExecutionInstance Exec>
    requires std::same_as<typename Exec::memory_space, Space>
  Buffer<Real, Space> probs(Exec const& exec, Routing<Real, Space> const& r) const {
    auto const n = static_cast<std::int64_t>(entry.size());
    auto at = exec.template allocate<std::int64_t>(n);
    ops::routed_index<Exec, Route>(exec, entry.view(), r.map.view(), Route::routed, at.view());
    auto p = exec.template allocate<Real>(n);
    ops::gather_or_zero<Exec, Real>(exec, View<std::int64_t const, Space>(at.view()), r.probs.view(),
                                    p.view());
    return p;
  }
  template <class Real>
  std::vector<Real> probs(Routing<Real> const& r) const
    requires(Space::host_accessible)
  {
    return probs(Cpu{}, r);
  }
};
/// The expert-major order of a host routing.
using ExpertMajorOrder = ExpertMajorOrderIn<HostSpace>;

/// `sort_chunks_by_idxs` as an index map (spec §2.3), built by the instance: cut rows into
/// consecutive chunks of `split_sizes`, then concatenate chunks `order[0], order[1], …`.
/// Returns, for each output row, its input row. Sizes and order are host metadata; two small
/// arrays (each output chunk's first row and source start) go to the instance's memory.
template <ExecutionInstance Exec>
Buffer<std::int64_t, typename Exec::memory_space> sort_chunks(
    Exec const& exec, std::span<std::int64_t const> split_sizes,
    std::span<std::int64_t const> order) {
  MOEFOLD_EXPECTS(order.size() == split_sizes.size(), "sort_chunks: {} chunk indices for {} chunks",
                  order.size(), split_sizes.size());
  using Space = typename Exec::memory_space;
  std::vector<std::int64_t> start(split_sizes.size(), 0);
  std::exclusive_scan(split_sizes.begin(), split_sizes.end(), start.begin(), std::int64_t{0});
  auto const chunks = static_cast<std::int64_t>(order.size());
  std::vector<std::int64_t> table(static_cast<std::size_t>(2 * chunks + 1), 0);  // out_start | in_start
  for (std::int64_t i = 0; i < chunks; ++i) {
    auto const c = order[static_cast<std::size_t>(i)];
    MOEFOLD_EXPECTS(c >= 0 && static_cast<std::size_t>(c) < split_sizes.size(),
                    "sort_chunks: chunk {} outside [0, {})", c, split_sizes.size());
    auto const u = static_cast<std::size_t>(i);
    table[u + 1] = table[u] + split_sizes[static_cast<std::size_t>(c)];
    table[static_cast<std::size_t>(chunks + 1 + i)] = start[static_cast<std::size_t>(c)];
  }
  auto const rows = table[static_cast<std::size_t>(chunks)];
  auto t = exec.template allocate<std::int64_t>(static_cast<std::int64_t>(table.size()));
  copy<std::int64_t>(exec, View<std::int64_t const>(table), t.view());
  auto src = exec.template allocate<std::int64_t>(rows);
  View<std::int64_t const, Space> const tv = t.view();
  ops::chunk_sources<Exec>(exec, tv.cols(0, chunks + 1), tv.cols(chunks + 1, chunks), src.view());
  return src;
}
/// `sort_chunks` on the host.
inline std::vector<std::int64_t> sort_chunks(std::span<std::int64_t const> split_sizes,
                                             std::span<std::int64_t const> order) {
  return sort_chunks(Cpu{}, split_sizes, order);
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
template <class Real, ExecutionInstance Exec>
void gather_rows(Exec const& exec,
                 std::type_identity_t<View<std::int64_t const, typename Exec::memory_space>> src,
                 std::type_identity_t<View<Real const, typename Exec::memory_space>> in,
                 std::type_identity_t<View<Real, typename Exec::memory_space>> out, std::int64_t h) {
  auto const n = src.size();
  MOEFOLD_EXPECTS(out.size() == n * h && in.size() == out.size(),
                  "gather_rows: {} rows of {} for buffers of {} and {}", n, h, in.size(),
                  out.size());
  ops::gather_rows<Exec, Real>(exec, src, in.reshaped(n, h), out.reshaped(n, h));
}

}  // namespace v0
}  // namespace moefold
