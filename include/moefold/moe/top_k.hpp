#pragma once
/// \file
/// Top-k selection over one token's expert scores, plain and group-limited (spec §2.2 step 4).
/// Ties break toward the lower expert id, everywhere, so routing is deterministic.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// Writes the indices of the `out.size()` largest `values` to `out`, best first; equal values
/// rank the lower index first. Requires `out.size() ≤ values.size()`; values must not be NaN.
template <class Real>
void top_k(std::span<Real const> values, std::span<int> out) {
  auto const k = out.size();
  MOEFOLD_EXPECTS(k <= values.size(), "top_k: k = {} exceeds the {} values", k, values.size());
  if (k == 0) return;
  // Insertion into a sorted buffer of k: strictly greater wins, so a later equal value never
  // displaces an earlier (lower) index.
  std::size_t filled = 0;
  for (std::size_t e = 0; e < values.size(); ++e) {
    Real const v = values[e];
    if (filled == k && !(v > values[static_cast<std::size_t>(out[k - 1])])) continue;
    std::size_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > values[static_cast<std::size_t>(out[pos - 1])]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<int>(e);
  }
}

/// Group-limited top-k (DeepSeek-style, spec §2.2): the E experts form `num_groups` contiguous
/// groups; a group scores the sum of its top `k / group_topk` values; only the `group_topk`
/// best groups (ties toward the lower group) stay eligible; then a plain top-k over the
/// eligible experts. `scratch` needs E + num_groups + E/num_groups entries of Real.
template <class Real>
void group_limited_top_k(std::span<Real const> values, int num_groups, int group_topk,
                         std::span<int> out, std::span<Real> scratch) {
  auto const e_count = values.size();
  auto const g_count = static_cast<std::size_t>(num_groups);
  MOEFOLD_EXPECTS(
      num_groups >= 1 && e_count % g_count == 0 && group_topk >= 1 && group_topk <= num_groups,
      "group_limited_top_k: {} experts, {} groups, group_topk {}", e_count, num_groups, group_topk);
  auto const per_group = e_count / g_count;
  auto const k_in_group = out.size() / static_cast<std::size_t>(group_topk);
  MOEFOLD_EXPECTS(k_in_group >= 1 && k_in_group <= per_group,
                  "group_limited_top_k: k / group_topk = {} must be in [1, {}]", k_in_group,
                  per_group);
  MOEFOLD_EXPECTS(scratch.size() >= e_count + g_count + per_group,
                  "group_limited_top_k: scratch too small");
  auto masked = scratch.first(e_count);
  auto group_score = scratch.subspan(e_count, g_count);
  std::int32_t idx_buf[64];
  MOEFOLD_EXPECTS(k_in_group <= 64 && g_count <= 64,
                  "group_limited_top_k: at most 64 groups and 64 picks per group");
  for (std::size_t g = 0; g < g_count; ++g) {
    std::span<int> picks(idx_buf, k_in_group);
    top_k(values.subspan(g * per_group, per_group), picks);
    Real s = 0;
    for (int i : picks) s += values[g * per_group + static_cast<std::size_t>(i)];
    group_score[g] = s;
  }
  std::span<int> groups(idx_buf, static_cast<std::size_t>(group_topk));
  top_k(std::span<Real const>(group_score.data(), g_count), groups);
  std::fill(masked.begin(), masked.end(), -std::numeric_limits<Real>::infinity());
  for (int g : groups)
    std::copy_n(
        values.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(g) * per_group),
        per_group,
        masked.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(g) * per_group));
  top_k(std::span<Real const>(masked.data(), e_count), out);
}

}  // namespace v0
}  // namespace moefold
