#pragma once
/// \file
/// Element-wise bodies and their launchers: fill, scale, y += a·x, y += x, the logistic
/// sigmoid. Every layer's plain vector arithmetic goes through these (one body per formula).
///
///   ops::add_into(exec, x, y);          // y[i] += x[i] (inputs convert: T comes from y)
///   ops::axpy(exec, T(0.5), x, y);      // y[i] += 0.5 · x[i]

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// σ(x) = 1 / (1 + e^(−x)).
template <class T>
MOEFOLD_HD inline T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

template <class T>
struct Fill {
  T* y;
  T value;
  MOEFOLD_HD void operator()(std::int64_t i) const { y[i] = value; }
};
template <class T>
struct Scale {
  T* y;
  compute_t<T> a;
  MOEFOLD_HD void operator()(std::int64_t i) const { y[i] = narrow<T>(widen(y[i]) * a); }
};
/// y[i] += a · x[i].
template <class T>
struct Axpy {
  T const* x;
  T* y;
  compute_t<T> a;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    y[i] = narrow<T>(widen(y[i]) + a * widen(x[i]));
  }
};
/// y[i] += x[i].
template <class T>
struct AddInto {
  T const* x;
  T* y;
  MOEFOLD_HD void operator()(std::int64_t i) const { y[i] = narrow<T>(widen(y[i]) + widen(x[i])); }
};

/// y[i] = x[i] converted (float → bf16 rounds to nearest even; bf16 → float is exact).
template <class Src, class Dst>
struct Convert {
  Src const* x;
  Dst* y;
  MOEFOLD_HD void operator()(std::int64_t i) const { y[i] = narrow<Dst>(widen(x[i])); }
};

/// y[i] rounded to `Narrow` and widened back: a wide computation storing what a `Narrow` one
/// would (bf16 logits computed with FP32 accumulation).
template <class Narrow, class T>
struct RoundThrough {
  T* y;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    y[i] = static_cast<T>(widen(narrow<Narrow>(y[i])));
  }
};

namespace detail {
template <class T, class U, class S>
void same_size(View<T, S> const& a, View<U, S> const& b, char const* op) {
  MOEFOLD_EXPECTS(a.size() == b.size() && a.contiguous() && b.contiguous(),
                  "ops::{}: operands of {} and {} elements (contiguous views of equal size needed)",
                  op, a.size(), b.size());
}
}  // namespace detail

/// y[i] = value.
template <class Exec, class T>
void fill(Exec const& exec, View<T, typename Exec::memory_space> y, std::type_identity_t<T> value) {
  MOEFOLD_EXPECTS(y.contiguous(), "ops::fill: a strided view");
  for_each(exec, y.size(), Fill<T>{y.data(), value});
}
/// y[i] *= a.
template <class Exec, class T>
void scale(Exec const& exec, std::type_identity_t<compute_t<T>> a,
           View<T, typename Exec::memory_space> y) {
  MOEFOLD_EXPECTS(y.contiguous(), "ops::scale: a strided view");
  for_each(exec, y.size(), Scale<T>{y.data(), a});
}
/// y[i] += a · x[i].
template <class Exec, class T>
void axpy(Exec const& exec, std::type_identity_t<compute_t<T>> a,
          std::type_identity_t<View<T const, typename Exec::memory_space>> x,
          View<T, typename Exec::memory_space> y) {
  detail::same_size(x, y, "axpy");
  for_each(exec, y.size(), Axpy<T>{x.data(), y.data(), a});
}
/// y[i] += x[i].
template <class Exec, class T>
void add_into(Exec const& exec, std::type_identity_t<View<T const, typename Exec::memory_space>> x,
              View<T, typename Exec::memory_space> y) {
  detail::same_size(x, y, "add_into");
  for_each(exec, y.size(), AddInto<T>{x.data(), y.data()});
}

/// y[i] = x[i] converted to y's type (the optimizer's FP32 main parameters written back to a
/// bf16 model, a bf16 model widened to its main parameters).
template <class Exec, class Src, class Dst>
void convert(Exec const& exec, std::type_identity_t<View<Src const, typename Exec::memory_space>> x,
             View<Dst, typename Exec::memory_space> y) {
  detail::same_size(x, y, "convert");
  for_each(exec, y.size(), Convert<Src, Dst>{x.data(), y.data()});
}

/// y[i] = y[i] rounded to `Narrow` (e.g. bf16) and back to T.
template <class Narrow, class Exec, class T>
void round_through(Exec const& exec, View<T, typename Exec::memory_space> y) {
  MOEFOLD_EXPECTS(y.contiguous(), "ops::round_through: a strided view");
  for_each(exec, y.size(), RoundThrough<Narrow, T>{y.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
