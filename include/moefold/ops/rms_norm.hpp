#pragma once
/// \file
/// RMSNorm's bodies (nn/rms_norm.hpp): per token row r of `[rows, h]`,
///
///   forward          rstd[r] = 1 / sqrt(mean(x²) + eps) (sum in double);  y = x · rstd · w
///
/// Elements of type T (float, double, bf16) are computed in `compute_t<T>` (FP32 for bf16) and
/// rounded once on store; rstd is kept in compute_t<T>, the weight gradient in grad_t<T>.
///   backward (input) dx = rstd · (g⊙w − x·rstd · mean(g⊙w⊙x̂)),  x̂ = x · rstd
///   backward (weight) dw[j] += Σ_r g[r, j] · x̂[r, j], rows in order, owned by column j
///
///   ops::rms_norm_forward(exec, x, w, eps, rstd, y);
///   ops::rms_norm_backward(exec, x, rstd, w, dy, dx, dw);

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/view_args.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// Row r: rstd[r] and y[r, ·].
template <class T>
struct RmsNormForward {
  using C = compute_t<T>;
  T const* x;
  T const* w;
  C* rstd;
  T* y;
  std::int64_t h;
  double eps;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    using std::sqrt;
    T const* xr = x + r * h;
    T* yr = y + r * h;
    double ss = 0;
    for (std::int64_t i = 0; i < h; ++i) ss += double(widen(xr[i])) * double(widen(xr[i]));
    C const rs = static_cast<C>(1.0 / sqrt(ss / double(h) + eps));
    rstd[r] = rs;
    for (std::int64_t i = 0; i < h; ++i) yr[i] = narrow<T>(widen(xr[i]) * rs * widen(w[i]));
  }
};

/// Row r: dx[r, ·].
template <class T>
struct RmsNormBackwardInput {
  using C = compute_t<T>;
  T const* x;
  C const* rstd;
  T const* w;
  T const* dy;
  T* dx;
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    T const* xr = x + r * h;
    T const* gr = dy + r * h;
    T* dr = dx + r * h;
    C const rs = rstd[r];
    double dot = 0;
    for (std::int64_t i = 0; i < h; ++i) {
      C const xh = widen(xr[i]) * rs;
      dot += double(widen(gr[i]) * widen(w[i])) * double(xh);
    }
    C const m = static_cast<C>(dot / double(h));
    for (std::int64_t i = 0; i < h; ++i)
      dr[i] = narrow<T>(rs * (widen(gr[i]) * widen(w[i]) - widen(xr[i]) * rs * m));
  }
};

/// Column j: dw[j] += Σ_r dy[r, j] · x[r, j] · rstd[r], r ascending.
template <class T>
struct RmsNormBackwardWeight {
  using C = compute_t<T>;
  T const* x;
  C const* rstd;
  T const* dy;
  grad_t<T>* dw;
  std::int64_t rows, h;
  MOEFOLD_HD void operator()(std::int64_t j) const {
    C acc = dw[j];
    for (std::int64_t r = 0; r < rows; ++r) {
      C const xh = widen(x[r * h + j]) * rstd[r];
      acc += widen(dy[r * h + j]) * xh;
    }
    dw[j] = acc;
  }
};

namespace detail {
template <class A, class B>
void check_rows(A const& a, B const& b, char const* op, char const* what) {
  MOEFOLD_EXPECTS(a.contiguous() && b.contiguous() && a.rows() == b.rows() && a.cols() == b.cols(),
                  "ops::{}: {} is {}×{}, expected {}×{} (contiguous)", op, what, b.rows(), b.cols(),
                  a.rows(), a.cols());
}
}  // namespace detail

/// y [rows, h] = RMSNorm(x [rows, h]) ⊙ w [h]; rstd [rows] for the backward.
template <class Exec, class T>
void rms_norm_forward(Exec const& exec, InView<Exec, T> x, InView<Exec, T> w, double eps,
                      OutView<Exec, compute_t<T>> rstd, OutView<Exec, T> y) {
  detail::check_rows(x, y, "rms_norm_forward", "y");
  MOEFOLD_EXPECTS(w.size() == x.cols() && rstd.size() == x.rows(),
                  "ops::rms_norm_forward: weight of {} for width {}, rstd of {} for {} rows",
                  w.size(), x.cols(), rstd.size(), x.rows());
  for_each_row(exec, x.rows(),
               RmsNormForward<T>{x.data(), w.data(), rstd.data(), y.data(), x.cols(), eps});
}

/// dx [rows, h] from dy and the saved x, rstd; dw [h] += this call's weight gradient.
template <class Exec, class T>
void rms_norm_backward(Exec const& exec, InView<Exec, T> x, InView<Exec, compute_t<T>> rstd,
                       InView<Exec, T> w, InView<Exec, T> dy, OutView<Exec, T> dx,
                       OutView<Exec, grad_t<T>> dw) {
  detail::check_rows(x, dy, "rms_norm_backward", "dy");
  detail::check_rows(x, dx, "rms_norm_backward", "dx");
  MOEFOLD_EXPECTS(w.size() == x.cols() && dw.size() == x.cols() && rstd.size() == x.rows(),
                  "ops::rms_norm_backward: weight {}, weight gradient {} for width {}, rstd of {} "
                  "for {} rows",
                  w.size(), dw.size(), x.cols(), rstd.size(), x.rows());
  for_each(
      exec, x.cols(),
      RmsNormBackwardWeight<T>{x.data(), rstd.data(), dy.data(), dw.data(), x.rows(), x.cols()});
  for_each_row(
      exec, x.rows(),
      RmsNormBackwardInput<T>{x.data(), rstd.data(), w.data(), dy.data(), dx.data(), x.cols()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
