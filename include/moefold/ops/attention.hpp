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
///
/// bf16 attention keeps its scores and dP in FP32, as a fused attention kernel does: the
/// out-of-place overloads read FP32 and write the bf16 probabilities and dS (rounded once).

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

/// Row i of p [rows, s] (ld s): the causal softmax of query position qpos[i] over keys kpos,
/// in place (float, double).
template <class T>
struct CausalSoftmax {
  T* p;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  std::int64_t s;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    using std::exp;
    T* MOEFOLD_RESTRICT row = p + i * s;
    std::int64_t const* MOEFOLD_RESTRICT kp = kpos;
    std::int64_t const q = qpos[i];
    T mx = -static_cast<T>(INFINITY);
    for (std::int64_t j = 0; j < s; ++j)
      if (kp[j] <= q) mx = mx < row[j] ? row[j] : mx;
    T sum{0};
    for (std::int64_t j = 0; j < s; ++j) {
      row[j] = kp[j] <= q ? exp(row[j] - mx) : T{0};
      sum += row[j];
    }
    for (std::int64_t j = 0; j < s; ++j) row[j] /= sum;
  }
};

/// Row i: the causal softmax of FP32 scores `in` written rounded once to `out` (bf16
/// probabilities, as a fused attention kernel keeps its scores in FP32).
template <class C, class T>
struct CausalSoftmaxTo {
  C const* in;
  T* out;
  std::int64_t const* qpos;
  std::int64_t const* kpos;
  std::int64_t s;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    using std::exp;
    C const* MOEFOLD_RESTRICT row = in + i * s;
    T* MOEFOLD_RESTRICT o = out + i * s;
    std::int64_t const q = qpos[i];
    C mx = -static_cast<C>(INFINITY);
    for (std::int64_t j = 0; j < s; ++j)
      if (kpos[j] <= q) mx = mx < row[j] ? row[j] : mx;
    C sum{0};
    for (std::int64_t j = 0; j < s; ++j)
      if (kpos[j] <= q) sum += exp(row[j] - mx);
    for (std::int64_t j = 0; j < s; ++j)
      o[j] = narrow<T>(kpos[j] <= q ? exp(row[j] - mx) / sum : C{0});
  }
};

/// Row i: d[i, ·] = p[i, ·] ⊙ (d[i, ·] − p[i, ·]·d[i, ·]) · scale (d: dP in, dS out), in place
/// (float, double).
template <class T>
struct SoftmaxBackward {
  T const* p;
  T* d;
  std::int64_t s;
  T scale;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    T const* MOEFOLD_RESTRICT pr = p + i * s;
    T* MOEFOLD_RESTRICT dr = d + i * s;
    T dot{0};
    for (std::int64_t j = 0; j < s; ++j) dot += pr[j] * dr[j];
    for (std::int64_t j = 0; j < s; ++j) dr[j] = pr[j] * (dr[j] - dot) * scale;
  }
};

/// Row i: dS from bf16 probabilities p and FP32 dP `din`, computed in FP32 and rounded once to
/// `dout` (the operand of the dQ and dK GEMMs).
template <class T, class C>
struct SoftmaxBackwardTo {
  T const* p;
  C const* din;
  T* dout;
  std::int64_t s;
  C scale;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    T const* MOEFOLD_RESTRICT pr = p + i * s;
    C const* MOEFOLD_RESTRICT dr = din + i * s;
    T* MOEFOLD_RESTRICT o = dout + i * s;
    C dot{0};
    for (std::int64_t j = 0; j < s; ++j) dot += widen(pr[j]) * dr[j];
    for (std::int64_t j = 0; j < s; ++j) o[j] = narrow<T>(widen(pr[j]) * (dr[j] - dot) * scale);
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
                      std::type_identity_t<T> scale) {
  MOEFOLD_EXPECTS(p.contiguous() && d.contiguous() && p.rows() == d.rows() && p.cols() == d.cols(),
                  "ops::softmax_backward: probabilities {}×{}, gradients {}×{}", p.rows(), p.cols(),
                  d.rows(), d.cols());
  for_each_row(exec, d.rows(), SoftmaxBackward<T>{p.data(), d.data(), d.cols(), scale});
}

/// FP32 scores [rows, s] → causal probabilities rounded to T (bf16) in p.
template <class Exec, class C, class T>
void causal_softmax(Exec const& exec, View<C const, typename Exec::memory_space> scores,
                    OutView<Exec, T> p,
                    View<std::int64_t const, typename Exec::memory_space> qpos,
                    View<std::int64_t const, typename Exec::memory_space> kpos) {
  MOEFOLD_EXPECTS(scores.contiguous() && p.contiguous() && p.rows() == scores.rows() &&
                      p.cols() == scores.cols() && qpos.size() == scores.rows() &&
                      kpos.size() == scores.cols(),
                  "ops::causal_softmax: scores {}×{}, probabilities {}×{}, {} query and {} key "
                  "positions",
                  scores.rows(), scores.cols(), p.rows(), p.cols(), qpos.size(), kpos.size());
  for_each_row(exec, scores.rows(),
               CausalSoftmaxTo<C, T>{scores.data(), p.data(), qpos.data(), kpos.data(),
                                     scores.cols()});
}

/// dS [rows, s] (T) from the saved probabilities p (T) and FP32 dP.
template <class Exec, class T, class C>
void softmax_backward(Exec const& exec, InView<Exec, T> p,
                      View<C const, typename Exec::memory_space> dp, OutView<Exec, T> ds,
                      std::type_identity_t<C> scale) {
  MOEFOLD_EXPECTS(p.contiguous() && dp.contiguous() && ds.contiguous() && p.rows() == dp.rows() &&
                      p.cols() == dp.cols() && ds.rows() == p.rows() && ds.cols() == p.cols(),
                  "ops::softmax_backward: probabilities {}×{}, dP {}×{}, dS {}×{}", p.rows(),
                  p.cols(), dp.rows(), dp.cols(), ds.rows(), ds.cols());
  for_each_row(exec, p.rows(),
               SoftmaxBackwardTo<T, C>{p.data(), dp.data(), ds.data(), p.cols(), scale});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
