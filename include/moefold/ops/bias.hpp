#pragma once
/// \file
/// A bias over the columns of a row-major [rows, cols] tensor (the attention's QKV bias):
///
///   AddRowBias     y[r, c] += b[c]
///   BiasGradient   db[c] += Σ_r dy[r, c], summed in double in row order (one body per column)
///
///   ops::add_row_bias(exec, b, y);       // b [cols], y [rows, cols]
///   ops::bias_gradient(exec, dy, db);    // dy [rows, cols], db [cols]

#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// Index i of y: y[i] += b[i % cols].
template <class T>
struct AddRowBias {
  T const* b;
  T* y;
  std::int64_t cols;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    y[i] = narrow<T>(widen(y[i]) + widen(b[i % cols]));
  }
};

/// Index c: db[c] += Σ_r dy[r·cols + c] over r in [0, rows), in order, in double.
template <class T, class G = T>
struct BiasGradient {
  T const* dy;
  G* db;  ///< grad_t<T>: FP32 for bf16 activations
  std::int64_t rows, cols;
  MOEFOLD_HD void operator()(std::int64_t c) const {
    double s = 0;
    for (std::int64_t r = 0; r < rows; ++r) s += static_cast<double>(widen(dy[r * cols + c]));
    db[c] += static_cast<G>(s);
  }
};

/// y [rows, b.size()] (contiguous): every row += b.
template <class Exec, class T>
void add_row_bias(Exec const& exec, View<T const, typename Exec::memory_space> b,
                  View<T, typename Exec::memory_space> y) {
  MOEFOLD_EXPECTS(b.contiguous() && y.contiguous() && b.size() > 0 && y.size() % b.size() == 0,
                  "ops::add_row_bias: {} elements are not whole rows of a bias of {}", y.size(),
                  b.size());
  for_each(exec, y.size(), AddRowBias<T>{b.data(), y.data(), b.size()});
}

/// db [cols] += the column sums of dy [rows, cols] (contiguous).
template <class Exec, class T>
void bias_gradient(Exec const& exec, View<T const, typename Exec::memory_space> dy,
                   View<grad_t<T>, typename Exec::memory_space> db) {
  MOEFOLD_EXPECTS(db.contiguous() && dy.contiguous() && db.size() > 0 && dy.size() % db.size() == 0,
                  "ops::bias_gradient: {} elements are not whole rows of a bias of {}", dy.size(),
                  db.size());
  for_each(exec, db.size(),
           BiasGradient<T, grad_t<T>>{dy.data(), db.data(), dy.size() / db.size(), db.size()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
