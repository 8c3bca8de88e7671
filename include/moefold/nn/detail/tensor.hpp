#pragma once
/// \file
/// Small helpers shared by the `nn/` layers: the row count of a `[rows, width]` buffer and the
/// divisibility checks whose messages name the layer, the rule and the numbers.

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

/// Rows of a row-major `[rows, width]` buffer; throws when `size` is not whole rows.
inline std::int64_t rows_of(std::size_t size, std::int64_t width, std::string_view layer) {
  MOEFOLD_EXPECTS(width > 0 && static_cast<std::int64_t>(size) % width == 0,
                  "{}: input holds {} elements, not whole rows of width {}", layer, size, width);
  return static_cast<std::int64_t>(size) / width;
}

/// Throws `invalid_config` "<layer>: <what> (n) is not divisible by <by_what> = d".
inline void require_divisible(std::int64_t n, std::int64_t d, std::string_view layer,
                              std::string_view what, std::string_view by_what) {
  if (d <= 0 || n % d != 0)
    throw invalid_config(
        fmt::format("{}: {} ({}) is not divisible by {} = {}", layer, what, n, by_what, d));
}

template <class T>
std::span<T const> cspan(std::vector<T> const& v) noexcept {
  return std::span<T const>(v);
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
