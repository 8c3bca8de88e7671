#pragma once
/// \file
/// The statistics and gradients of the router's auxiliary losses as bodies (spec §2.2 steps 3
/// and 6): per token the load-balancing scores and their top-k (`AuxScoresTopK`); per
/// (sequence slot b, expert e) the count of tokens whose top-k holds e (`SlotKeys` and the
/// instance's `histogram`) and the column sum of the scores over the tokens of slot b
/// (`ColumnSums`: each body sums, in token order, the columns it owns); the switch loss's
/// gradient (`AddCountsGradient`); the z-loss's logsumexp rows, their sum of squares and its
/// gradient. B = 1 gives the plain (not per-sequence) statistics.

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/router.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// scores[t, ·] = Score's load-balancing scores of logits[t, ·]; idx[t, ·] their plain top-K.
template <class Score, class T>
struct AuxScoresTopK {
  RouterRule rule;
  T const* logits;
  T* scores;
  int* idx;
  MOEFOLD_HD void operator()(std::int64_t t) const {
    Score::aux_scores(rule, logits + t * rule.experts, scores + t * rule.experts);
    top_k_row(static_cast<T const*>(scores + t * rule.experts), rule.experts, idx + t * rule.topk,
              rule.topk);
  }
};

/// keys[t·K + k] = (t mod B)·E + idx[t·K + k]: the (slot, expert) column each top-k entry
/// counts in (`histogram` then counts them).
struct SlotKeys {
  int const* idx;
  std::int64_t experts, topk, slots;
  std::int64_t* keys;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    keys[i] = (i / topk) % slots * experts + idx[i];
  }
};

/// Columns per `ColumnSums` body: a cache line of floats, read row by row.
inline constexpr std::int64_t kColumnBlock = 16;

/// sums[b·E + c] = Σ over tokens t ≡ b (mod B), in token order, of scores[t, c], for the
/// kColumnBlock columns c of block i (each column's sum is its own, in token order).
template <class T>
struct ColumnSums {
  T const* scores;
  std::int64_t tokens, experts, slots;
  T* sums;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const blocks = (experts + kColumnBlock - 1) / kColumnBlock;
    std::int64_t const b = i / blocks, c0 = i % blocks * kColumnBlock;
    std::int64_t const n = experts - c0 < kColumnBlock ? experts - c0 : kColumnBlock;
    T s[kColumnBlock] = {};
    for (std::int64_t t = b; t < tokens; t += slots)
      for (std::int64_t j = 0; j < n; ++j) s[j] += scores[t * experts + c0 + j];
    for (std::int64_t j = 0; j < n; ++j) sums[b * experts + c0 + j] = s[j];
  }
};

/// d[t, c] += T(w · n[(t mod B)·E + c]) for the columns of row t: ∂(switch loss)/∂scores.
template <class T>
struct AddCountsGradient {
  double const* n;
  std::int64_t experts, slots;
  double w;
  T* d;
  MOEFOLD_HD void operator()(std::int64_t t) const {
    double const* nb = n + t % slots * experts;
    T* row = d + t * experts;
    for (std::int64_t c = 0; c < experts; ++c) row[c] += static_cast<T>(w * nb[c]);
  }
};

/// lse[t] = logsumexp(logits[t, ·]) in double, stable. Shared by the z-loss and its gradient.
template <class T>
MOEFOLD_HD void logsumexp_parts(T const* row, std::int64_t n, double& m, double& s) {
  using std::exp;
  m = static_cast<double>(row[0]);
  for (std::int64_t e = 0; e < n; ++e) {
    double const v = static_cast<double>(row[e]);
    m = m < v ? v : m;  // std::max(m, v)
  }
  s = 0;
  for (std::int64_t e = 0; e < n; ++e) s += exp(static_cast<double>(row[e]) - m);
}
template <class T>
struct LogSumExpRows {
  T const* logits;
  std::int64_t experts;
  double* lse;
  MOEFOLD_HD void operator()(std::int64_t t) const {
    using std::log;
    double m, s;
    logsumexp_parts(logits + t * experts, experts, m, s);
    lse[t] = m + log(s);
  }
};
/// out[0] = Σ_t lse[t]², in token order (one body owns the sum).
struct SumOfSquares {
  double const* x;
  std::int64_t n;
  double* out;
  MOEFOLD_HD void operator()(std::int64_t) const {
    double total = 0;
    for (std::int64_t t = 0; t < n; ++t) total += x[t] * x[t];
    out[0] = total;
  }
};
/// d[t, e] += T(g_t · softmax(logits[t, ·])_e) with g_t = scale·c·2·lse_t / tokens: the z-loss
/// `c · mean_t lse_t²`'s gradient, times scale.
template <class T>
struct ZLossBackward {
  T const* logits;
  std::int64_t tokens, experts;
  double c, scale;
  T* d;
  MOEFOLD_HD void operator()(std::int64_t t) const {
    using std::exp;
    using std::log;
    T const* row = logits + t * experts;
    double m, s;
    logsumexp_parts(row, experts, m, s);
    double const lse = m + log(s);
    double const g = scale * c * 2.0 * lse / static_cast<double>(tokens);
    for (std::int64_t e = 0; e < experts; ++e)
      d[t * experts + e] += static_cast<T>(g * exp(static_cast<double>(row[e]) - m) / s);
  }
};

/// scores [T, E] = Score's load-balancing scores of logits [T, E]; idx [T, K] their top-K.
template <class Score, class Exec, class T>
void aux_scores_top_k(Exec const& exec, RouterRule const& rule,
                      View<T const, typename Exec::memory_space> logits,
                      View<T, typename Exec::memory_space> scores,
                      View<int, typename Exec::memory_space> idx) {
  MOEFOLD_EXPECTS(logits.contiguous() && logits.cols() == rule.experts &&
                      scores.size() == logits.size() && idx.size() == logits.rows() * rule.topk,
                  "ops::aux_scores_top_k: logits {}×{}, scores {}, ids {} (E = {}, K = {})",
                  logits.rows(), logits.cols(), scores.size(), idx.size(), rule.experts, rule.topk);
  for_each_row(exec, logits.rows(),
               AuxScoresTopK<Score, T>{rule, logits.data(), scores.data(), idx.data()});
}

/// counts [B·E] and sums [B·E] over the tokens of each slot b = t mod B (B = slots), from the
/// top-K ids idx [T·K] and the scores [T, E]; `keys` [T·K] is scratch when B > 1. Counts come
/// from the instance's `histogram`.
template <class Exec, class T>
void column_statistics(Exec const& exec, View<int const, typename Exec::memory_space> idx,
                       View<T const, typename Exec::memory_space> scores, std::int64_t topk,
                       std::int64_t slots, View<std::int64_t, typename Exec::memory_space> keys,
                       View<std::int64_t, typename Exec::memory_space> counts,
                       View<T, typename Exec::memory_space> sums) {
  std::int64_t const tokens = scores.rows(), experts = scores.cols();
  MOEFOLD_EXPECTS(slots >= 1 && counts.size() == slots * experts && sums.size() == counts.size() &&
                      idx.size() == tokens * topk && (slots == 1 || keys.size() == idx.size()),
                  "ops::column_statistics: {} tokens × {} experts in {} slots, {} counts, {} sums",
                  tokens, experts, slots, counts.size(), sums.size());
  if (slots == 1) {
    histogram<int>(exec, idx, counts);
  } else {
    for_each(exec, idx.size(), SlotKeys{idx.data(), experts, topk, slots, keys.data()});
    histogram<std::int64_t>(exec, View<std::int64_t const, typename Exec::memory_space>(keys),
                            counts);
  }
  std::int64_t const blocks = (experts + kColumnBlock - 1) / kColumnBlock;
  for_each(exec, slots * blocks, ColumnSums<T>{scores.data(), tokens, experts, slots, sums.data()});
}

/// d [T, E] += T(w · n[(t mod B)·E + c]) with n [B·E] (B = slots).
template <class Exec, class T>
void add_counts_gradient(Exec const& exec, View<double const, typename Exec::memory_space> n,
                         std::int64_t slots, double w, View<T, typename Exec::memory_space> d) {
  MOEFOLD_EXPECTS(d.contiguous() && slots >= 1 && n.size() == slots * d.cols(),
                  "ops::add_counts_gradient: {} counts for {} slots of {} experts", n.size(), slots,
                  d.cols());
  for_each_row(exec, d.rows(), AddCountsGradient<T>{n.data(), d.cols(), slots, w, d.data()});
}

/// lse [T] = logsumexp of every row of logits [T, E]; total [1] = Σ_t lse_t² in token order.
template <class Exec, class T>
void logsumexp_squares(Exec const& exec, View<T const, typename Exec::memory_space> logits,
                       View<double, typename Exec::memory_space> lse,
                       View<double, typename Exec::memory_space> total) {
  MOEFOLD_EXPECTS(logits.contiguous() && lse.size() == logits.rows() && total.size() == 1,
                  "ops::logsumexp_squares: logits {}×{}, {} lse, {} totals", logits.rows(),
                  logits.cols(), lse.size(), total.size());
  for_each_row(exec, logits.rows(), LogSumExpRows<T>{logits.data(), logits.cols(), lse.data()});
  for_each(exec, 1, SumOfSquares{lse.data(), lse.size(), total.data()});
}

/// d [T, E] += scale · ∂(c · mean_t lse_t²)/∂logits.
template <class Exec, class T>
void z_loss_backward(Exec const& exec, View<T const, typename Exec::memory_space> logits, double c,
                     double scale, View<T, typename Exec::memory_space> d) {
  MOEFOLD_EXPECTS(logits.contiguous() && d.contiguous() && d.size() == logits.size(),
                  "ops::z_loss_backward: logits {}×{}, gradient of {}", logits.rows(),
                  logits.cols(), d.size());
  for_each_row(exec, logits.rows(),
               ZLossBackward<T>{logits.data(), logits.rows(), logits.cols(), c, scale, d.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
