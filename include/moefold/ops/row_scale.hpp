#pragma once
/// \file
/// Rows scaled by one value each — the experts' routing probability and the shared expert's
/// gate — with their backward:
///
///   ops::scale_rows(exec, a, p, out);                  // out[i, j] = a[i, j] · p[i]
///   ops::scale_rows_backward(exec, ds, a, p, da, dp);  // da = ds · p; dp[i] = ⟨ds[i], a[i]⟩
///   ops::add_scaled_rows(exec, s, g, y);                // y[i, j] += s[i, j] · g[i]

#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// out[i] = a[i] · p[i / f] over rows of f.
template <class T>
struct ScaleRows {
  T const* a;
  T const* p;
  T* out;
  std::int64_t f;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    out[i] = narrow<T>(widen(a[i]) * widen(p[i / f]));
  }
};

/// One row of the backward of out = a · p (p a scalar): da[j] = ds[j] · p; returns
/// Σ_j ds[j] · a[j], j ascending.
template <class T>
MOEFOLD_HD inline compute_t<T> scale_row_backward(T const* ds, T const* a, T p, T* da,
                                                  std::int64_t f) {
  compute_t<T> acc{};
  for (std::int64_t j = 0; j < f; ++j) {
    compute_t<T> const d = widen(ds[j]);
    acc += d * widen(a[j]);
    da[j] = narrow<T>(d * widen(p));
  }
  return acc;
}

/// Row i: dp[i] = Σ_j ds[i, j] · a[i, j] (j ascending), da[i, j] = ds[i, j] · p[i].
template <class T>
struct ScaleRowsBackward {
  T const* ds;
  T const* a;
  T const* p;
  T* da;
  T* dp;
  std::int64_t f;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    dp[i] = narrow<T>(scale_row_backward(ds + i * f, a + i * f, p[i], da + i * f, f));
  }
};

/// y[i] += s[i] · g[i / f].
template <class T>
struct AddScaledRows {
  T const* s;
  T const* g;
  T* y;
  std::int64_t f;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    y[i] = narrow<T>(widen(y[i]) + widen(s[i]) * widen(g[i / f]));
  }
};

namespace detail {
template <class A, class B>
void rows_of(A const& a, B const& p, char const* op) {
  MOEFOLD_EXPECTS(a.contiguous() && p.contiguous() && p.size() == a.rows(),
                  "ops::{}: {} row values for a {}×{} view", op, p.size(), a.rows(), a.cols());
}
}  // namespace detail

/// out [rows, f] = a · p per row.
template <class Exec, class T>
void scale_rows(Exec const& exec, View<T const, typename Exec::memory_space> a,
                View<T const, typename Exec::memory_space> p,
                View<T, typename Exec::memory_space> out) {
  detail::rows_of(a, p, "scale_rows");
  MOEFOLD_EXPECTS(out.contiguous() && out.size() == a.size(),
                  "ops::scale_rows: output of {} for input of {}", out.size(), a.size());
  for_each(exec, a.size(), ScaleRows<T>{a.data(), p.data(), out.data(), a.cols()});
}

/// da = ds · p per row, dp[i] = ⟨ds[i], a[i]⟩: the backward of `scale_rows`.
template <class Exec, class T>
void scale_rows_backward(Exec const& exec, View<T const, typename Exec::memory_space> ds,
                         View<T const, typename Exec::memory_space> a,
                         View<T const, typename Exec::memory_space> p,
                         View<T, typename Exec::memory_space> da,
                         View<T, typename Exec::memory_space> dp) {
  detail::rows_of(a, p, "scale_rows_backward");
  MOEFOLD_EXPECTS(ds.contiguous() && da.contiguous() && ds.size() == a.size() &&
                      da.size() == a.size() && dp.size() == p.size(),
                  "ops::scale_rows_backward: ds {}, da {}, dp {} for {}×{} rows", ds.size(),
                  da.size(), dp.size(), a.rows(), a.cols());
  for_each_row(exec, a.rows(),
               ScaleRowsBackward<T>{ds.data(), a.data(), p.data(), da.data(), dp.data(), a.cols()});
}

/// y [rows, f] += s · g per row.
template <class Exec, class T>
void add_scaled_rows(Exec const& exec, View<T const, typename Exec::memory_space> s,
                     View<T const, typename Exec::memory_space> g,
                     View<T, typename Exec::memory_space> y) {
  detail::rows_of(s, g, "add_scaled_rows");
  MOEFOLD_EXPECTS(y.contiguous() && y.size() == s.size(),
                  "ops::add_scaled_rows: output of {} for input of {}", y.size(), s.size());
  for_each(exec, s.size(), AddScaledRows<T>{s.data(), g.data(), y.data(), s.cols()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
