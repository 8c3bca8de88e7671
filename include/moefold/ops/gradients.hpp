#pragma once
/// \file
/// The per-element and per-tensor pieces of gradient handling (train/gradient_reduction.hpp,
/// train/finalize_model_grads.hpp, train/decoder_stage.hpp):
///
///   ScaleInDouble   g[i] = T(double(g[i]) · coeff)       (gradient clipping)
///   SumInDouble     out[0] = Σ_i double(x[i]) or Σ_i double(x[i])², i in order (one body owns
///                   the whole sum)
///
/// The two reductions are single bodies that walk their tensor in index order, so their
/// result is the same floating-point sum on every instance (and under any launch order); a
/// caller that needs several sums launches one body per tensor.

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/finite.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// y[i] = T(double(y[i]) · a).
template <class T>
struct ScaleInDouble {
  T* y;
  double a;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    y[i] = static_cast<T>(static_cast<double>(y[i]) * a);
  }
};

/// out[0] = Σ double(x[i]) over i in [0, n), in order — or, with `squares`, Σ double(x[i])²
/// (launched with one index).
template <class T>
struct SumInDouble {
  T const* x;
  std::int64_t n;
  bool squares;
  double* out;
  MOEFOLD_HD void operator()(std::int64_t) const {
    double s = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      double const v = static_cast<double>(x[i]);
      s += squares ? v * v : v;
    }
    out[0] = s;
  }
};


namespace detail {
template <class T, class S>
void one_result(View<T, S> const& x, std::int64_t out_size, char const* op) {
  MOEFOLD_EXPECTS(x.contiguous() && out_size == 1,
                  "ops::{}: a contiguous input and one output element needed (input {}×{}, "
                  "output {} elements)",
                  op, x.rows(), x.cols(), out_size);
}
}  // namespace detail

/// y[i] = T(double(y[i]) · a).
template <class Exec, class T>
void scale_in_double(Exec const& exec, double a, View<T, typename Exec::memory_space> y) {
  MOEFOLD_EXPECTS(y.contiguous(), "ops::scale_in_double: a strided view");
  for_each(exec, y.size(), ScaleInDouble<T>{y.data(), a});
}
/// out[0] = Σ_i double(x[i])², summed in index order.
template <class Exec, class T>
void sum_of_squares(Exec const& exec, View<T const, typename Exec::memory_space> x,
                    View<double, typename Exec::memory_space> out) {
  detail::one_result(x, out.size(), "sum_of_squares");
  for_each(exec, 1, SumInDouble<T>{x.data(), x.size(), true, out.data()});
}
/// out[0] = Σ_i double(x[i]), summed in index order.
template <class Exec, class T>
void sum_in_double(Exec const& exec, View<T const, typename Exec::memory_space> x,
                   View<double, typename Exec::memory_space> out) {
  detail::one_result(x, out.size(), "sum_in_double");
  for_each(exec, 1, SumInDouble<T>{x.data(), x.size(), false, out.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
