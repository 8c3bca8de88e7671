#pragma once
/// \file
/// The pieces of the vocabulary-parallel cross-entropy (nn/vocab_parallel_cross_entropy.hpp),
/// one body per token row of this rank's logits `[rows, n]` (vocabulary ids [v0, v0 + n)):
///
///   RowMax          mx[r] = max_i logits[r, i]
///   SumExp          e[r, i] = exp(logits[r, i] − mx[r]);  sum[r] = Σ_i e[r, i];
///                   target[r] = logits[r, label − v0] − mx[r] if this rank owns the label, else 0
///   CrossEntropyLoss  loss[r] = log sum[r] − target[r];  e[r, ·] /= sum[r] (the softmax)
///   CrossEntropyGrad  d[r, i] = softmax[r, i] · dloss[r], minus dloss[r] at the owned label
///
/// Between RowMax and SumExp the maxima are all-reduced (max), after SumExp the sums and the
/// target logits (sum) — the layer's collectives.

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

template <class T>
struct RowMax {
  T const* x;
  T* mx;
  std::int64_t n;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    T m = -static_cast<T>(INFINITY);
    for (std::int64_t i = 0; i < n; ++i) m = m < x[r * n + i] ? x[r * n + i] : m;
    mx[r] = m;
  }
};

template <class T>
struct SumExp {
  T const* logits;
  T const* mx;
  std::int64_t const* labels;
  T* e;
  T* sum;
  T* target;
  std::int64_t n, v0;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    using std::exp;
    T const* MOEFOLD_RESTRICT x = logits + r * n;
    T* MOEFOLD_RESTRICT er = e + r * n;
    T const m = mx[r];
    T s{};
    for (std::int64_t i = 0; i < n; ++i) {
      er[i] = exp(x[i] - m);
      s += er[i];
    }
    sum[r] = s;
    std::int64_t const local = labels[r] - v0;
    target[r] = local >= 0 && local < n ? x[local] - m : T{};
  }
};

template <class T>
struct CrossEntropyLoss {
  T const* sum;
  T const* target;
  T* softmax;
  T* loss;
  std::int64_t n;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    using std::log;
    loss[r] = log(sum[r]) - target[r];
    for (std::int64_t i = 0; i < n; ++i) softmax[r * n + i] /= sum[r];
  }
};

template <class T>
struct CrossEntropyGrad {
  T const* softmax;
  T const* dloss;
  std::int64_t const* labels;
  T* d;
  std::int64_t n, v0;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    for (std::int64_t i = 0; i < n; ++i) d[r * n + i] = softmax[r * n + i] * dloss[r];
    std::int64_t const local = labels[r] - v0;
    if (local >= 0 && local < n) d[r * n + local] -= dloss[r];
  }
};

namespace detail {
template <class A>
void check_logits(A const& logits, std::int64_t rows, char const* op) {
  MOEFOLD_EXPECTS(logits.contiguous() && logits.rows() == rows,
                  "ops::{}: logits {}×{} (contiguous) for {} tokens", op, logits.rows(),
                  logits.cols(), rows);
}
}  // namespace detail

/// mx [rows] = the row maxima of logits [rows, n].
template <class Exec, class T>
void row_max(Exec const& exec, InView<Exec, T> logits, OutView<Exec, T> mx) {
  detail::check_logits(logits, mx.size(), "row_max");
  for_each_row(exec, mx.size(), RowMax<T>{logits.data(), mx.data(), logits.cols()});
}

/// e [rows, n] = exp(logits − mx), sum [rows] its row sums, target [rows] the owned labels'
/// shifted logits (0 where another rank owns the label); this rank holds ids [v0, v0 + n).
template <class Exec, class T>
void sum_exp(Exec const& exec, InView<Exec, T> logits, InView<Exec, T> mx,
             View<std::int64_t const, typename Exec::memory_space> labels, std::int64_t v0,
             OutView<Exec, T> e, OutView<Exec, T> sum, OutView<Exec, T> target) {
  std::int64_t const rows = mx.size();
  detail::check_logits(logits, rows, "sum_exp");
  MOEFOLD_EXPECTS(e.size() == logits.size() && labels.size() == rows && sum.size() == rows &&
                      target.size() == rows,
                  "ops::sum_exp: {} rows, {} labels, {} sums, {} targets, {} of {} exponentials",
                  rows, labels.size(), sum.size(), target.size(), e.size(), logits.size());
  for_each_row(exec, rows,
               SumExp<T>{logits.data(), mx.data(), labels.data(), e.data(), sum.data(),
                         target.data(), logits.cols(), v0});
}

/// loss [rows] = log sum − target; softmax [rows, n] (holding e) divided by the sums.
template <class Exec, class T>
void cross_entropy_loss(Exec const& exec, InView<Exec, T> sum, InView<Exec, T> target,
                        OutView<Exec, T> softmax, OutView<Exec, T> loss) {
  std::int64_t const rows = loss.size();
  detail::check_logits(softmax, rows, "cross_entropy_loss");
  MOEFOLD_EXPECTS(sum.size() == rows && target.size() == rows,
                  "ops::cross_entropy_loss: {} losses, {} sums, {} targets", rows, sum.size(),
                  target.size());
  for_each_row(
      exec, rows,
      CrossEntropyLoss<T>{sum.data(), target.data(), softmax.data(), loss.data(), softmax.cols()});
}

/// d [rows, n] = (softmax − onehot(label)) · dloss over this rank's ids [v0, v0 + n).
template <class Exec, class T>
void cross_entropy_grad(Exec const& exec, InView<Exec, T> softmax, InView<Exec, T> dloss,
                        View<std::int64_t const, typename Exec::memory_space> labels,
                        std::int64_t v0, OutView<Exec, T> d) {
  std::int64_t const rows = dloss.size();
  detail::check_logits(softmax, rows, "cross_entropy_grad");
  MOEFOLD_EXPECTS(labels.size() == rows && d.size() == softmax.size() && d.contiguous(),
                  "ops::cross_entropy_grad: {} rows, {} labels, {} gradients for {} logits", rows,
                  labels.size(), d.size(), softmax.size());
  for_each_row(exec, rows,
               CrossEntropyGrad<T>{softmax.data(), dloss.data(), labels.data(), d.data(),
                                   softmax.cols(), v0});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
