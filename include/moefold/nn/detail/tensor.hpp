#pragma once
/// \file
/// Small helpers shared by the `nn/` layers: the row count of a `[rows, width]` buffer, the
/// divisibility checks whose messages name the layer, the rule and the numbers, and the reuse
/// of a layer's per-step buffers.

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

/// Rows of a row-major `[rows, width]` buffer; throws when `size` is not whole rows.
inline std::int64_t rows_of(std::size_t size, std::int64_t width, std::string_view layer) {
  MOEFOLD_EXPECTS(width > 0 && static_cast<std::int64_t>(size) % width == 0,
                  "{}: input holds {} elements, not whole rows of width {}", layer, size, width);
  return static_cast<std::int64_t>(size) / width;
}
/// The same for a view (which must be contiguous).
template <class T, class S>
std::int64_t rows_of(View<T, S> const& v, std::int64_t width, std::string_view layer) {
  MOEFOLD_EXPECTS(v.contiguous(), "{}: a strided input view", layer);
  return rows_of(static_cast<std::size_t>(v.size()), width, layer);
}

/// Throws `invalid_config` "<layer>: <what> (n) is not divisible by <by_what> = d".
inline void require_divisible(std::int64_t n, std::int64_t d, std::string_view layer,
                              std::string_view what, std::string_view by_what) {
  if (d <= 0 || n % d != 0)
    throw invalid_config(
        fmt::format("{}: {} ({}) is not divisible by {} = {}", layer, what, n, by_what, d));
}

/// A contiguous view's elements as one row (1-D).
template <class T, class S>
View<T, S> flat(View<T, S> v) {
  MOEFOLD_EXPECTS(v.contiguous(), "a strided view where a contiguous one is needed ({}×{}, ld {})",
                  v.rows(), v.cols(), v.ld());
  return View<T, S>(v.data(), v.size());
}

/// `b` holding n elements: reallocated through `exec` only when its size differs (a layer's
/// per-step buffer reused across calls; its contents are not kept over a reallocation).
template <class Exec, class T>
View<T, typename Exec::memory_space> reuse(Exec const& exec,
                                           Buffer<T, typename Exec::memory_space>& b,
                                           std::int64_t n) {
  if (static_cast<std::int64_t>(b.size()) != n) b = exec.template allocate<T>(n);
  return b.view();
}

/// A new buffer of n elements from `exec`, filled by `write(view)`: the returning form of a
/// layer's forward/backward over its form that writes into a caller's view.
template <class T, class Exec, class F>
Buffer<T, typename Exec::memory_space> allocated(Exec const& exec, std::int64_t n, F&& write) {
  auto out = exec.template allocate<T>(n);
  write(out.view());
  return out;
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
