#pragma once
/// \file
/// Top-k selection over expert scores, plain and group-limited (spec §2.2 step 4), row by row
/// on an execution instance (the row bodies are in ops/router.hpp). Ties break toward the lower
/// expert id, everywhere, so routing is deterministic. A 1-D view is one row:
///
///   top_k<float>(exec, scores, ids);   // scores [T, E] → ids [T, K], best first

#include <type_traits>

#include "moefold/core/view.hpp"
#include "moefold/ops/router.hpp"

namespace moefold {
inline namespace v0 {

/// Writes the indices of the `out.cols()` largest values of every row of `values` to that row
/// of `out`, best first; equal values rank the lower index first. Requires k ≤ the row length;
/// values must not be NaN.
template <class Real, class Exec>
void top_k(Exec const& exec,
           std::type_identity_t<View<Real const, typename Exec::memory_space>> values,
           std::type_identity_t<View<int, typename Exec::memory_space>> out) {
  ops::top_k(exec, values, out);
}

/// Group-limited top-k (DeepSeek-style, spec §2.2) of every row: the E experts form
/// `num_groups` contiguous groups; a group scores the sum of its top `k / group_topk` values;
/// only the `group_topk` best groups (ties toward the lower group) stay eligible; then a plain
/// top-k over the eligible experts. `scratch` needs rows·(E + num_groups) entries of Real.
template <class Real, class Exec>
void group_limited_top_k(Exec const& exec,
                         std::type_identity_t<View<Real const, typename Exec::memory_space>> values,
                         int num_groups, int group_topk,
                         std::type_identity_t<View<int, typename Exec::memory_space>> out,
                         std::type_identity_t<View<Real, typename Exec::memory_space>> scratch) {
  ops::group_limited_top_k(exec, values, num_groups, group_topk, out, scratch);
}

}  // namespace v0
}  // namespace moefold
