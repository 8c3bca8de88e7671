#pragma once
/// \file
/// The per-row math of causal attention (nn/attention.hpp), one body per score row:
///
///   forward   P[i, j] = softmax over the keys j with kpos[j] ≤ qpos[i] of S[i, ·]; 0 elsewhere
///   backward  dS[i, j] = P[i, j] · (dP[i, j] − Σ_j P[i, j]·dP[i, j]) · scale
///
/// The mask compares global positions (context parallelism gathers keys out of order).
///
///   ops::causal_softmax(exec, scores, qpos, kpos);              // in place, [sq, sk]
///   ops::softmax_backward(exec, probs, dprobs, scale);           // dprobs → dscores in place

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/view_args.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// Row i of p [rows, s] (ld s): the causal softmax of query position qpos[i] over keys kpos.
template <class T>
struct CausalSoftmax {
  T* p;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  std::int64_t s;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    using std::exp;
    using C = compute_t<T>;
    T* MOEFOLD_RESTRICT row = p + i * s;
    std::int64_t const* MOEFOLD_RESTRICT kp = kpos;
    std::int64_t const q = qpos[i];
    C mx = -static_cast<C>(INFINITY);
    for (std::int64_t j = 0; j < s; ++j)
      if (kp[j] <= q) mx = mx < widen(row[j]) ? widen(row[j]) : mx;
    C sum{0};
    if constexpr (std::is_same_v<T, C>) {  // the exponentials kept in the row
      for (std::int64_t j = 0; j < s; ++j) {
        row[j] = kp[j] <= q ? exp(row[j] - mx) : T{0};
        sum += row[j];
      }
      for (std::int64_t j = 0; j < s; ++j) row[j] /= sum;
    } else {  // bf16 scores: FP32 exponentials and sum, each probability rounded once
      for (std::int64_t j = 0; j < s; ++j)
        if (kp[j] <= q) sum += exp(widen(row[j]) - mx);
      for (std::int64_t j = 0; j < s; ++j)
        row[j] = narrow<T>(kp[j] <= q ? exp(widen(row[j]) - mx) / sum : C{0});
    }
  }
};

/// Row i: d[i, ·] = p[i, ·] ⊙ (d[i, ·] − p[i, ·]·d[i, ·]) · scale (d: dP in, dS out).
template <class T>
struct SoftmaxBackward {
  T const* p;
  T* d;
  std::int64_t s;
  compute_t<T> scale;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    T const* MOEFOLD_RESTRICT pr = p + i * s;
    T* MOEFOLD_RESTRICT dr = d + i * s;
    compute_t<T> dot{0};
    for (std::int64_t j = 0; j < s; ++j) dot += widen(pr[j]) * widen(dr[j]);
    for (std::int64_t j = 0; j < s; ++j)
      dr[j] = narrow<T>(widen(pr[j]) * (widen(dr[j]) - dot) * scale);
  }
};

/// scores [rows, s] → causal probabilities in place; qpos [rows], kpos [s] global positions.
template <class Exec, class T>
void causal_softmax(Exec const& exec, OutView<Exec, T> scores,
                    View<std::int64_t const, typename Exec::memory_space> qpos,
                    View<std::int64_t const, typename Exec::memory_space> kpos) {
  MOEFOLD_EXPECTS(
      scores.contiguous() && qpos.size() == scores.rows() && kpos.size() == scores.cols(),
      "ops::causal_softmax: scores {}×{} (ld {}), {} query and {} key positions", scores.rows(),
      scores.cols(), scores.ld(), qpos.size(), kpos.size());
  for_each_row(exec, scores.rows(),
               CausalSoftmax<T>{scores.data(), qpos.data(), kpos.data(), scores.cols()});
}

/// d [rows, s]: dP → dS in place, from the saved probabilities p [rows, s].
template <class Exec, class T>
void softmax_backward(Exec const& exec, InView<Exec, T> p, OutView<Exec, T> d,
                      std::type_identity_t<compute_t<T>> scale) {
  MOEFOLD_EXPECTS(p.contiguous() && d.contiguous() && p.rows() == d.rows() && p.cols() == d.cols(),
                  "ops::softmax_backward: probabilities {}×{}, gradients {}×{}", p.rows(), p.cols(),
                  d.rows(), d.cols());
  for_each_row(exec, d.rows(), SoftmaxBackward<T>{p.data(), d.data(), d.cols(), scale});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
