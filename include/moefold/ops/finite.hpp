#pragma once
/// \file
/// The NaN/Inf check of the router's logits, the loss and the gradients: per row of a view, the
/// first column whose value is not finite (−1 when all are). A 1-D view is one row.

#include <cmath>
#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// bad[r] = the smallest c with double(x[r, c]) not finite, or −1.
template <class T>
struct RowFirstNonFinite {
  T const* x;
  std::int64_t cols;
  std::int64_t* bad;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    using std::isfinite;
    bad[r] = -1;
    for (std::int64_t c = 0; c < cols; ++c)
      if (!isfinite(static_cast<double>(widen(x[r * cols + c])))) {
        bad[r] = c;
        return;
      }
  }
};

/// bad [rows] = the first non-finite column of every row of x [rows, cols], or −1.
template <class Exec, class T>
void first_non_finite(Exec const& exec, View<T const, typename Exec::memory_space> x,
                      View<std::int64_t, typename Exec::memory_space> bad) {
  MOEFOLD_EXPECTS(x.contiguous() && bad.size() == x.rows(),
                  "ops::first_non_finite: {} rows, {} outputs", x.rows(), bad.size());
  for_each_row(exec, x.rows(), RowFirstNonFinite<T>{x.data(), x.cols(), bad.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
