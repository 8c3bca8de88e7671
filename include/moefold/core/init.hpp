#pragma once
/// \file
/// Deterministic parameter initialization that does not depend on the folding: a parameter's
/// value is a function of (seed, parameter name, global element index) only, so every folding
/// holds slices of the same global tensors, and a checkpoint can be resharded.
///
///   // rows [r0, r0+n) of a global [out, in] weight, e.g. a column-parallel shard:
///   moefold::init_rows(std::span<float>(w), seed, "layers.0.attn.qkv.weight",
///                      /*global_cols=*/in, r0, n, moefold::InitDist::normal, 0.02);

#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <string_view>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
/// SplitMix64's finalizer: a bijective mix of 64 bits.
MOEFOLD_HD constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
/// FNV-1a of a name.
constexpr std::uint64_t hash_name(std::string_view s) noexcept {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}
/// A uniform double in [0, 1) from 53 random bits.
MOEFOLD_HD constexpr double unit(std::uint64_t bits) noexcept {
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}
}  // namespace detail

/// The distribution of initial values.
enum class InitDist : std::uint8_t {
  uniform,  ///< uniform in [-scale, scale)
  normal,   ///< normal with mean 0 and standard deviation `scale`
  constant, ///< every element equals `scale` (e.g. 1 for norm weights)
};

/// The initial value of element `index` of parameter `name` under `seed`.
inline double init_value(std::uint64_t seed, std::string_view name, std::uint64_t index,
                         InitDist dist, double scale) noexcept {
  std::uint64_t const key = detail::mix64(seed ^ detail::mix64(detail::hash_name(name)));
  std::uint64_t const a = detail::mix64(key ^ detail::mix64(2 * index));
  switch (dist) {
    case InitDist::uniform: return scale * (2.0 * detail::unit(a) - 1.0);
    case InitDist::normal: {
      std::uint64_t const b = detail::mix64(key ^ detail::mix64(2 * index + 1));
      double const u1 = 1.0 - detail::unit(a);  // (0, 1]
      double const u2 = detail::unit(b);
      return scale * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
    }
    case InitDist::constant: return scale;
  }
  return 0.0;
}

/// Fills `out` (row-major, `rows` × `cols`) with the block of a global row-major tensor of
/// `global_cols` columns that starts at (row0, col0).
template <class T>
void init_block(std::span<T> out, std::uint64_t seed, std::string_view name,
                std::int64_t global_cols, std::int64_t row0, std::int64_t rows, std::int64_t col0,
                std::int64_t cols, InitDist dist, double scale) {
  MOEFOLD_EXPECTS(static_cast<std::int64_t>(out.size()) == rows * cols,
                  "init_block of '{}': buffer holds {} elements, block is {}×{}", name, out.size(),
                  rows, cols);
  MOEFOLD_EXPECTS(col0 >= 0 && col0 + cols <= global_cols && row0 >= 0,
                  "init_block of '{}': columns [{}, {}) outside [0, {})", name, col0, col0 + cols,
                  global_cols);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c)
      out[static_cast<std::size_t>(r * cols + c)] = static_cast<T>(init_value(
          seed, name, static_cast<std::uint64_t>((row0 + r) * global_cols + col0 + c), dist, scale));
}

/// Fills `out` with rows [row0, row0 + out.size()/global_cols) of a global row-major tensor.
template <class T>
void init_rows(std::span<T> out, std::uint64_t seed, std::string_view name,
               std::int64_t global_cols, std::int64_t row0, InitDist dist, double scale) {
  MOEFOLD_EXPECTS(global_cols > 0 && static_cast<std::int64_t>(out.size()) % global_cols == 0,
                  "init_rows of '{}': {} elements are not whole rows of {}", name, out.size(),
                  global_cols);
  init_block(out, seed, name, global_cols, row0,
             static_cast<std::int64_t>(out.size()) / global_cols, 0, global_cols, dist, scale);
}

}  // namespace v0
}  // namespace moefold
