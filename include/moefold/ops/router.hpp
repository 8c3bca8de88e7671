#pragma once
/// \file
/// The router's per-token arithmetic as row bodies (spec §2.2 step 4): a stable softmax row,
/// top-k with ties toward the lower expert id (plain and group-limited), the score functions
/// (`SoftmaxRow`, `SigmoidRow`, Sinkhorn's activation `SinkhornRow`) with their backward, and
/// the bodies the router launches: `RouteTokens` (selection values with the expert bias, top-k,
/// probabilities, scaling factor, written into the dense routing) and `RouteBackward`
/// (∂probs → ∂logits, plus the load-balancing scores' part). One body call owns one token row.
///
///   ops::top_k(exec, values, idx);               // values [R, n] → idx [R, k], best first
///   ops::softmax_rows(exec, logits, scores);     // scores[r, ·] = softmax(logits[r, ·])

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/finite.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// The router's per-token rules as plain values a body carries (from `RouterConfig`).
struct RouterRule {
  std::int64_t experts = 0;  ///< E
  std::int64_t topk = 0;     ///< K
  bool pre_softmax = false;  ///< softmax over all E before the top-k
  bool sigmoid = false;      ///< the sigmoid score function (ConfiguredScore's choice)
  bool sinkhorn = false;     ///< Sinkhorn routing (S-BASE)
  int num_groups = 0;        ///< group-limited top-k (0: off)
  int group_topk = 0;
};

/// The most groups and picks per group `group_limited_top_k_row` handles.
inline constexpr std::int64_t kMaxGroupPicks = 64;

/// out[0, n) = softmax(x[0, n)), stable (the maximum subtracted).
template <class T>
MOEFOLD_HD void softmax_row(T const* x, std::int64_t n, T* out) {
  using std::exp;
  T m = x[0];
  for (std::int64_t i = 0; i < n; ++i) m = m < x[i] ? x[i] : m;  // std::max(m, x[i])
  T s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += (out[i] = exp(x[i] - m));
  T const inv = T(1) / s;
  for (std::int64_t i = 0; i < n; ++i) out[i] *= inv;
}

/// The indices of the k largest of values[0, n) into out[0, k), best first; equal values rank
/// the lower index first (k ≤ n; no NaN).
template <class T>
MOEFOLD_HD void top_k_row(T const* values, std::int64_t n, int* out, std::int64_t k) {
  if (k == 0) return;
  // Insertion into a sorted buffer of k: strictly greater wins, so a later equal value never
  // displaces an earlier (lower) index.
  std::int64_t filled = 0;
  for (std::int64_t e = 0; e < n; ++e) {
    T const v = values[e];
    if (filled == k && !(v > values[out[k - 1]])) continue;
    std::int64_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > values[out[pos - 1]]) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<int>(e);
  }
}

/// Group-limited top-k (DeepSeek-style): the n values form `groups` contiguous groups; a group
/// scores the sum of its top k/group_topk values; only the `group_topk` best groups (ties toward
/// the lower group) stay eligible; then a plain top-k over the eligible ones. `scratch` holds
/// n + groups values. Preconditions (checked by the launcher): groups divides n, k/group_topk in
/// [1, n/groups], groups and k/group_topk at most kMaxGroupPicks.
template <class T>
MOEFOLD_HD void group_limited_top_k_row(T const* values, std::int64_t n, int groups, int group_topk,
                                        int* out, std::int64_t k, T* scratch) {
  std::int64_t const per_group = n / groups;
  std::int64_t const k_in_group = k / group_topk;
  T* masked = scratch;
  T* group_score = scratch + n;
  int idx_buf[kMaxGroupPicks];
  for (std::int64_t g = 0; g < groups; ++g) {
    top_k_row(values + g * per_group, per_group, idx_buf, k_in_group);
    T s = 0;
    for (std::int64_t i = 0; i < k_in_group; ++i) s += values[g * per_group + idx_buf[i]];
    group_score[g] = s;
  }
  top_k_row(group_score, groups, idx_buf, group_topk);
  for (std::int64_t i = 0; i < n; ++i) masked[i] = -static_cast<T>(INFINITY);
  for (std::int64_t j = 0; j < group_topk; ++j)
    for (std::int64_t i = 0; i < per_group; ++i)
      masked[idx_buf[j] * per_group + i] = values[idx_buf[j] * per_group + i];
  top_k_row(masked, n, out, k);
}

/// Softmax scores. Without `pre_softmax`: top-k on the raw logits, then a softmax over the K
/// chosen logits. With it: softmax over all E, then top-k, no renormalization.
struct SoftmaxRow {
  /// The values top-k ranks, sel[E] (`bias` is unused: expert bias needs sigmoid).
  template <class T>
  MOEFOLD_HD static void selection_values(RouterRule const& r, T const* logits, T const* /*bias*/,
                                          T* sel) {
    if (r.pre_softmax)
      softmax_row(logits, r.experts, sel);
    else
      for (std::int64_t e = 0; e < r.experts; ++e) sel[e] = logits[e];
  }
  /// Unscaled probabilities probs[K] of the chosen experts idx[K]; scratch[E].
  template <class T>
  MOEFOLD_HD static void probs(RouterRule const& r, T const* logits, int const* idx, T* probs,
                               T* scratch) {
    if (r.pre_softmax) {
      softmax_row(logits, r.experts, scratch);
      for (std::int64_t k = 0; k < r.topk; ++k) probs[k] = scratch[idx[k]];
    } else {
      for (std::int64_t k = 0; k < r.topk; ++k) scratch[k] = logits[idx[k]];
      softmax_row(scratch, r.topk, probs);
    }
  }
  /// Adds d(Σ_k d_probs[k]·probs[k]) / d logits to d_logits[E]; scratch[2E].
  template <class T>
  MOEFOLD_HD static void backward(RouterRule const& r, T const* logits, int const* idx,
                                  T const* d_probs, T* d_logits, T* scratch) {
    if (r.pre_softmax) {
      softmax_row(logits, r.experts, scratch);
      T dot = 0;
      for (std::int64_t k = 0; k < r.topk; ++k) dot += scratch[idx[k]] * d_probs[k];
      for (std::int64_t e = 0; e < r.experts; ++e) d_logits[e] -= scratch[e] * dot;
      for (std::int64_t k = 0; k < r.topk; ++k) d_logits[idx[k]] += scratch[idx[k]] * d_probs[k];
    } else {
      T* p = scratch;
      probs(r, logits, idx, p, scratch + r.topk);
      T dot = 0;
      for (std::int64_t k = 0; k < r.topk; ++k) dot += p[k] * d_probs[k];
      for (std::int64_t k = 0; k < r.topk; ++k) d_logits[idx[k]] += p[k] * (d_probs[k] - dot);
    }
  }
  /// Scores of the load-balancing losses: softmax over all E.
  template <class T>
  MOEFOLD_HD static void aux_scores(RouterRule const& r, T const* logits, T* scores) {
    softmax_row(logits, r.experts, scores);
  }
  /// Adds the gradient of Σ_e d_scores[e]·scores[e] to d_logits, given the scores.
  template <class T>
  MOEFOLD_HD static void aux_scores_backward(RouterRule const& r, T const* /*logits*/,
                                             T const* scores, T const* d_scores, T* d_logits) {
    T dot = 0;
    for (std::int64_t e = 0; e < r.experts; ++e) dot += scores[e] * d_scores[e];
    for (std::int64_t e = 0; e < r.experts; ++e) d_logits[e] += scores[e] * (d_scores[e] - dot);
  }
};

/// Sigmoid scores: σ(logits); top-k on σ (+ expert bias, which selects but never weights); the
/// chosen scores divided by their sum (+1e-20) when K > 1.
struct SigmoidRow {
  static constexpr double kEps = 1e-20;

  template <class T>
  MOEFOLD_HD static void selection_values(RouterRule const& r, T const* logits, T const* bias,
                                          T* sel) {
    for (std::int64_t e = 0; e < r.experts; ++e)
      sel[e] = sigmoid(logits[e]) + (bias == nullptr ? T(0) : bias[e]);
  }
  template <class T>
  MOEFOLD_HD static void probs(RouterRule const& r, T const* logits, int const* idx, T* probs,
                               T* /*scratch*/) {
    T sum = 0;
    for (std::int64_t k = 0; k < r.topk; ++k) sum += (probs[k] = sigmoid(logits[idx[k]]));
    if (r.topk > 1) {
      T const inv = T(1) / (sum + T(kEps));
      for (std::int64_t k = 0; k < r.topk; ++k) probs[k] *= inv;
    }
  }
  template <class T>
  MOEFOLD_HD static void backward(RouterRule const& r, T const* logits, int const* idx,
                                  T const* d_probs, T* d_logits, T* scratch) {
    T* s = scratch;
    T sum = 0;
    for (std::int64_t k = 0; k < r.topk; ++k) sum += (s[k] = sigmoid(logits[idx[k]]));
    T dot = 0;
    for (std::int64_t k = 0; k < r.topk; ++k) dot += d_probs[k] * s[k];
    T const d = sum + T(kEps);
    for (std::int64_t k = 0; k < r.topk; ++k) {
      T const ds = r.topk > 1 ? d_probs[k] / d - dot / (d * d) : d_probs[k];
      d_logits[idx[k]] += ds * s[k] * (T(1) - s[k]);
    }
  }
  /// Scores of the load-balancing losses: σ normalized by its sum over all E (+1e-20).
  template <class T>
  MOEFOLD_HD static void aux_scores(RouterRule const& r, T const* logits, T* scores) {
    T sum = 0;
    for (std::int64_t e = 0; e < r.experts; ++e) sum += (scores[e] = sigmoid(logits[e]));
    T const inv = T(1) / (sum + T(kEps));
    for (std::int64_t e = 0; e < r.experts; ++e) scores[e] *= inv;
  }
  template <class T>
  MOEFOLD_HD static void aux_scores_backward(RouterRule const& r, T const* logits, T const* scores,
                                             T const* d_scores, T* d_logits) {
    T sum = 0, dot = 0;
    for (std::int64_t e = 0; e < r.experts; ++e) sum += sigmoid(logits[e]);
    T const d = sum + T(kEps);
    // scores = σ/d, so Σ d_scores·σ/d² = dot(d_scores, scores)/d.
    for (std::int64_t e = 0; e < r.experts; ++e) dot += d_scores[e] * scores[e];
    for (std::int64_t e = 0; e < r.experts; ++e) {
      T const s = sigmoid(logits[e]);
      d_logits[e] += (d_scores[e] / d - dot / d) * s * (T(1) - s);
    }
  }
};

/// Sinkhorn routing's activation: sigmoid for top-1, softmax over all E above; its
/// probabilities are the activation's chosen values, not renormalized.
struct SinkhornRow {
  template <class T>
  MOEFOLD_HD static void activation(RouterRule const& r, T const* logits, T* out) {
    if (r.topk == 1)
      for (std::int64_t e = 0; e < r.experts; ++e) out[e] = sigmoid(logits[e]);
    else
      softmax_row(logits, r.experts, out);
  }
  template <class T>
  MOEFOLD_HD static void backward(RouterRule r, T const* logits, int const* idx, T const* d_probs,
                                  T* d_logits, T* scratch) {
    if (r.topk == 1) {  // one chosen score, not renormalized
      SigmoidRow::backward(r, logits, idx, d_probs, d_logits, scratch);
    } else {
      r.pre_softmax = true;  // the softmax over all E
      SoftmaxRow::backward(r, logits, idx, d_probs, d_logits, scratch);
    }
  }
};

/// The score function `RouterRule::sigmoid` names, chosen per call at run time: each call is
/// `SigmoidRow`'s or `SoftmaxRow`'s.
struct ConfiguredRow {
  template <class T>
  MOEFOLD_HD static void selection_values(RouterRule const& r, T const* logits, T const* bias,
                                          T* sel) {
    if (r.sigmoid)
      SigmoidRow::selection_values(r, logits, bias, sel);
    else
      SoftmaxRow::selection_values(r, logits, bias, sel);
  }
  template <class T>
  MOEFOLD_HD static void probs(RouterRule const& r, T const* logits, int const* idx, T* probs,
                               T* scratch) {
    if (r.sigmoid)
      SigmoidRow::probs(r, logits, idx, probs, scratch);
    else
      SoftmaxRow::probs(r, logits, idx, probs, scratch);
  }
  template <class T>
  MOEFOLD_HD static void backward(RouterRule const& r, T const* logits, int const* idx,
                                  T const* d_probs, T* d_logits, T* scratch) {
    if (r.sigmoid)
      SigmoidRow::backward(r, logits, idx, d_probs, d_logits, scratch);
    else
      SoftmaxRow::backward(r, logits, idx, d_probs, d_logits, scratch);
  }
  template <class T>
  MOEFOLD_HD static void aux_scores(RouterRule const& r, T const* logits, T* scores) {
    if (r.sigmoid)
      SigmoidRow::aux_scores(r, logits, scores);
    else
      SoftmaxRow::aux_scores(r, logits, scores);
  }
  template <class T>
  MOEFOLD_HD static void aux_scores_backward(RouterRule const& r, T const* logits, T const* scores,
                                             T const* d_scores, T* d_logits) {
    if (r.sigmoid)
      SigmoidRow::aux_scores_backward(r, logits, scores, d_scores, d_logits);
    else
      SoftmaxRow::aux_scores_backward(r, logits, scores, d_scores, d_logits);
  }
};

/// One token's routing. `Score` is a row score policy (SoftmaxRow, SigmoidRow or one that
/// chooses between them). Writes the token's K ids into `topk`, and `routed` with
/// `scale · prob` into its row of the dense `map` / `probs` (entries it does not choose are
/// left as they are). Sinkhorn routing selects on `select` (the balanced logits, training) or
/// on the activation (null `select`).
template <class Score, class T, class M>
struct RouteTokens {
  RouterRule rule;
  T const* logits;  ///< [T, E]
  T const* bias;    ///< [E] or null
  T const* select;  ///< Sinkhorn's balanced logits [T, E], or null
  T* sel;           ///< scratch [T, E]
  T* scratch;       ///< scratch [T, stride]
  std::int64_t stride;
  T* top_probs;  ///< scratch [T, K]
  int* topk;     ///< [T, K]
  M* map;        ///< [T, E]
  M routed;
  T* probs;  ///< [T, E]
  T scale;

  MOEFOLD_HD void operator()(std::int64_t t) const {
    std::int64_t const e_count = rule.experts, k_count = rule.topk;
    T const* lrow = logits + t * e_count;
    T* s = sel + t * e_count;
    int* idx = topk + t * k_count;
    T* p = top_probs + t * k_count;
    if (rule.sinkhorn) {
      SinkhornRow::activation(rule, lrow, s);
      top_k_row(select != nullptr ? select + t * e_count : s, e_count, idx, k_count);
      for (std::int64_t k = 0; k < k_count; ++k) p[k] = s[idx[k]];
    } else {
      T* w = scratch + t * stride;
      Score::selection_values(rule, lrow, bias, s);
      if (rule.num_groups > 0)
        group_limited_top_k_row(static_cast<T const*>(s), e_count, rule.num_groups, rule.group_topk,
                                idx, k_count, w);
      else
        top_k_row(static_cast<T const*>(s), e_count, idx, k_count);
      Score::probs(rule, lrow, idx, p, w);
    }
    for (std::int64_t k = 0; k < k_count; ++k) {
      std::int64_t const at = t * e_count + idx[k];
      map[at] = routed;
      probs[at] = scale * p[k];
    }
  }
};

/// One token's ∂logits row: zeroed, then the probabilities' part from d_probs [T, E] (entries
/// outside the routing ignored; × scale), then, when `aux_scores` is set, the load-balancing
/// scores' part with ∂loss/∂scores = aux_scale · aux_d_scores.
template <class Score, class T>
struct RouteBackward {
  RouterRule rule;
  T const* logits;        ///< [T, E]
  int const* topk;        ///< [T, K]
  T const* d_probs;       ///< [T, E]
  T const* aux_scores;    ///< [T, E] or null
  T const* aux_d_scores;  ///< [T, E]
  T* d_logits;            ///< [T, E]
  T* dk;                  ///< scratch [T, K]
  T* scratch;             ///< scratch [T, 2E]
  T scale, aux_scale;

  MOEFOLD_HD void operator()(std::int64_t t) const {
    std::int64_t const e_count = rule.experts, k_count = rule.topk;
    std::int64_t const row = t * e_count;
    int const* idx = topk + t * k_count;
    T* d = dk + t * k_count;
    T* w = scratch + 2 * row;
    T* drow = d_logits + row;
    for (std::int64_t e = 0; e < e_count; ++e) drow[e] = T(0);
    for (std::int64_t k = 0; k < k_count; ++k) d[k] = scale * d_probs[row + idx[k]];
    if (rule.sinkhorn)
      SinkhornRow::backward(rule, logits + row, idx, static_cast<T const*>(d), drow, w);
    else
      Score::backward(rule, logits + row, idx, static_cast<T const*>(d), drow, w);
    if (aux_scores != nullptr) {
      for (std::int64_t e = 0; e < e_count; ++e) w[e] = aux_scale * aux_d_scores[row + e];
      Score::aux_scores_backward(rule, logits + row, aux_scores + row, static_cast<T const*>(w),
                                 drow);
    }
  }
};

/// idx[r, ·] = the k = idx.cols() largest of values[r, ·], best first, ties toward the lower
/// column.
template <class T>
struct TopK {
  T const* values;
  std::int64_t n;
  int* out;
  std::int64_t k;
  MOEFOLD_HD void operator()(std::int64_t r) const { top_k_row(values + r * n, n, out + r * k, k); }
};
/// Group-limited top-k per row; scratch [rows, n + groups].
template <class T>
struct GroupLimitedTopK {
  T const* values;
  std::int64_t n;
  int groups, group_topk;
  int* out;
  std::int64_t k;
  T* scratch;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    group_limited_top_k_row(values + r * n, n, groups, group_topk, out + r * k, k,
                            scratch + r * (n + groups));
  }
};
/// out[r, ·] = softmax(x[r, ·]).
template <class T>
struct SoftmaxRows {
  T const* x;
  T* out;
  std::int64_t n;
  MOEFOLD_HD void operator()(std::int64_t r) const { softmax_row(x + r * n, n, out + r * n); }
};

/// Aux-loss-free balancing: bias[e] += T(rate · sign(mean − counts[e])).
template <class T>
struct ExpertBiasUpdate {
  std::int64_t const* counts;
  double mean, rate;
  T* bias;
  MOEFOLD_HD void operator()(std::int64_t e) const {
    double const d = mean - static_cast<double>(counts[e]);
    bias[e] += static_cast<T>(rate * static_cast<double>((d > 0) - (d < 0)));
  }
};

namespace detail {
template <class A, class B, class S>
void same_rows(View<A, S> const& a, View<B, S> const& b, char const* op) {
  MOEFOLD_EXPECTS(a.contiguous() && b.contiguous() && a.rows() == b.rows(),
                  "ops::{}: {}×{} and {}×{} (contiguous views with the same rows needed)", op,
                  a.rows(), a.cols(), b.rows(), b.cols());
}
}  // namespace detail

/// out [R, n] = softmax of every row of x [R, n].
template <class Exec, class T>
void softmax_rows(Exec const& exec, View<T const, typename Exec::memory_space> x,
                  View<T, typename Exec::memory_space> out) {
  detail::same_rows(x, out, "softmax_rows");
  MOEFOLD_EXPECTS(x.cols() == out.cols() && x.cols() >= 1,
                  "ops::softmax_rows: rows of {} values into rows of {}", x.cols(), out.cols());
  for_each_row(exec, x.rows(), SoftmaxRows<T>{x.data(), out.data(), x.cols()});
}

/// out [R, k] = the top-k ids of every row of values [R, n].
template <class Exec, class T>
void top_k(Exec const& exec, View<T const, typename Exec::memory_space> values,
           View<int, typename Exec::memory_space> out) {
  detail::same_rows(values, out, "top_k");
  MOEFOLD_EXPECTS(out.cols() <= values.cols(), "top_k: k = {} exceeds the {} values", out.cols(),
                  values.cols());
  for_each_row(exec, values.rows(), TopK<T>{values.data(), values.cols(), out.data(), out.cols()});
}

/// Checks the group-limited top-k's shape rules (E experts, G groups, top-k k).
inline void check_group_limited(std::int64_t e_count, int groups, int group_topk, std::int64_t k) {
  MOEFOLD_EXPECTS(groups >= 1 && e_count % groups == 0 && group_topk >= 1 && group_topk <= groups,
                  "group_limited_top_k: {} experts, {} groups, group_topk {}", e_count, groups,
                  group_topk);
  std::int64_t const k_in_group = k / group_topk, per_group = e_count / groups;
  MOEFOLD_EXPECTS(k_in_group >= 1 && k_in_group <= per_group,
                  "group_limited_top_k: k / group_topk = {} must be in [1, {}]", k_in_group,
                  per_group);
  MOEFOLD_EXPECTS(k_in_group <= kMaxGroupPicks && groups <= kMaxGroupPicks,
                  "group_limited_top_k: at most {} groups and {} picks per group", kMaxGroupPicks,
                  kMaxGroupPicks);
}

/// out [R, k] = the group-limited top-k of every row of values [R, n]; scratch [R·(n + groups)].
template <class Exec, class T>
void group_limited_top_k(Exec const& exec, View<T const, typename Exec::memory_space> values,
                         int groups, int group_topk, View<int, typename Exec::memory_space> out,
                         View<T, typename Exec::memory_space> scratch) {
  detail::same_rows(values, out, "group_limited_top_k");
  check_group_limited(values.cols(), groups, group_topk, out.cols());
  MOEFOLD_EXPECTS(scratch.size() >= values.rows() * (values.cols() + groups),
                  "group_limited_top_k: scratch too small ({} for {} rows of {} + {})",
                  scratch.size(), values.rows(), values.cols(), groups);
  for_each_row(exec, values.rows(),
               GroupLimitedTopK<T>{values.data(), values.cols(), groups, group_topk, out.data(),
                                   out.cols(), scratch.data()});
}

/// Scratch values per token `route_tokens` needs: group-limited top-k's E + G, or the
/// probabilities' E.
inline std::int64_t route_scratch_stride(RouterRule const& r) {
  return r.experts + (r.num_groups > 0 ? r.num_groups : 0);
}

/// Routes every token of logits [T, E] (`RouteTokens`): ids into topk [T, K], `routed` and
/// the scaled probabilities into map / probs [T, E]. `bias` [E] and `select` [T, E] may be
/// empty; the scratch views hold T·E, T·route_scratch_stride(rule) and T·K values.
template <class Score, class Exec, class T, class M>
void route_tokens(
    Exec const& exec, RouterRule const& rule, View<T const, typename Exec::memory_space> logits,
    View<T const, typename Exec::memory_space> bias,
    View<T const, typename Exec::memory_space> select, T scale,
    View<int, typename Exec::memory_space> topk, View<M, typename Exec::memory_space> map, M routed,
    View<T, typename Exec::memory_space> probs, View<T, typename Exec::memory_space> sel,
    View<T, typename Exec::memory_space> scratch, View<T, typename Exec::memory_space> top_probs) {
  std::int64_t const tokens = logits.rows(), stride = route_scratch_stride(rule);
  MOEFOLD_EXPECTS(logits.contiguous() && logits.cols() == rule.experts &&
                      topk.size() == tokens * rule.topk && map.size() == logits.size() &&
                      probs.size() == logits.size() && sel.size() >= logits.size() &&
                      scratch.size() >= tokens * stride && top_probs.size() >= tokens * rule.topk,
                  "ops::route_tokens: logits {}×{} (E = {}, K = {}), {} ids, map {}, probs {}",
                  logits.rows(), logits.cols(), rule.experts, rule.topk, topk.size(), map.size(),
                  probs.size());
  MOEFOLD_EXPECTS(bias.empty() || bias.size() == rule.experts,
                  "ops::route_tokens: expert bias of {} for {} experts", bias.size(), rule.experts);
  MOEFOLD_EXPECTS(select.empty() || select.size() == logits.size(),
                  "ops::route_tokens: {} selection values for {} logits", select.size(),
                  logits.size());
  if (rule.num_groups > 0 && !rule.sinkhorn)
    check_group_limited(rule.experts, rule.num_groups, rule.group_topk, rule.topk);
  for_each_row(exec, tokens,
               RouteTokens<Score, T, M>{rule, logits.data(), bias.empty() ? nullptr : bias.data(),
                                        select.empty() ? nullptr : select.data(), sel.data(),
                                        scratch.data(), stride, top_probs.data(), topk.data(),
                                        map.data(), routed, probs.data(), scale});
}

/// d_logits [T, E] from d_probs [T, E] (`RouteBackward`); `aux_scores` may be empty (no
/// load-balancing loss). Scratch: dk [T·K], scratch [T·2E].
template <class Score, class Exec, class T>
void route_backward(Exec const& exec, RouterRule const& rule,
                    View<T const, typename Exec::memory_space> logits,
                    View<int const, typename Exec::memory_space> topk,
                    View<T const, typename Exec::memory_space> d_probs,
                    View<T const, typename Exec::memory_space> aux_scores,
                    View<T const, typename Exec::memory_space> aux_d_scores, T scale, T aux_scale,
                    View<T, typename Exec::memory_space> d_logits,
                    View<T, typename Exec::memory_space> dk,
                    View<T, typename Exec::memory_space> scratch) {
  std::int64_t const tokens = logits.rows();
  MOEFOLD_EXPECTS(
      logits.contiguous() && logits.cols() == rule.experts && topk.size() == tokens * rule.topk &&
          d_probs.size() == logits.size() && d_logits.size() == logits.size() &&
          dk.size() >= tokens * rule.topk && scratch.size() >= 2 * logits.size(),
      "ops::route_backward: logits {}×{} (E = {}, K = {}), {} ids, d_probs {}", logits.rows(),
      logits.cols(), rule.experts, rule.topk, topk.size(), d_probs.size());
  MOEFOLD_EXPECTS(aux_scores.empty() ||
                      (aux_scores.size() == logits.size() && aux_d_scores.size() == logits.size()),
                  "ops::route_backward: {} load-balancing scores for {} logits", aux_scores.size(),
                  logits.size());
  for_each_row(
      exec, tokens,
      RouteBackward<Score, T>{rule, logits.data(), topk.data(), d_probs.data(),
                              aux_scores.empty() ? nullptr : aux_scores.data(), aux_d_scores.data(),
                              d_logits.data(), dk.data(), scratch.data(), scale, aux_scale});
}

/// bias [E] += rate · sign(mean − counts[e]).
template <class Exec, class T>
void expert_bias_update(Exec const& exec,
                        View<std::int64_t const, typename Exec::memory_space> counts, double mean,
                        double rate, View<T, typename Exec::memory_space> bias) {
  MOEFOLD_EXPECTS(counts.size() == bias.size(), "ops::expert_bias_update: {} counts, {} biases",
                  counts.size(), bias.size());
  for_each(exec, bias.size(), ExpertBiasUpdate<T>{counts.data(), mean, rate, bias.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
