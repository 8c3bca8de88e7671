#pragma once
/// \file
/// Rotary position embeddings (RoPE), Megatron's default "rotate half" form on the whole head:
/// for i < d/2 and θᵢ = pos · base^(−2i/d),
///
///   out[i]       = x[i]·cos θᵢ − x[i+d/2]·sin θᵢ
///   out[i+d/2]   = x[i+d/2]·cos θᵢ + x[i]·sin θᵢ
///
/// A rotation, so its backward is the rotation by −θ. Positions are global sequence positions
/// (`SequenceShard::cp_positions`), which makes RoPE independent of the folding.

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// cos/sin of every (position, frequency) pair of a list of positions.
class RotaryTable {
 public:
  /// Throws when `head_dim` is odd.
  RotaryTable(std::span<std::int64_t const> positions, std::int64_t head_dim, double base)
      : half_(head_dim / 2) {
    MOEFOLD_EXPECTS(head_dim > 0 && head_dim % 2 == 0,
                    "rotary embedding needs an even head dimension (got {})", head_dim);
    cos_.resize(positions.size() * static_cast<std::size_t>(half_));
    sin_.resize(cos_.size());
    for (std::size_t p = 0; p < positions.size(); ++p)
      for (std::int64_t i = 0; i < half_; ++i) {
        double const inv_freq = std::pow(base, -2.0 * double(i) / double(head_dim));
        double const theta = double(positions[p]) * inv_freq;
        auto const k = p * static_cast<std::size_t>(half_) + static_cast<std::size_t>(i);
        cos_[k] = std::cos(theta);
        sin_[k] = std::sin(theta);
      }
  }

  /// Rotates the head vector `x` (head_dim elements) of the `p`-th position in place; by −θ
  /// when `inverse` (the backward pass).
  template <class T>
  void rotate(T* x, std::size_t p, bool inverse = false) const {
    double const sign = inverse ? -1.0 : 1.0;
    for (std::int64_t i = 0; i < half_; ++i) {
      auto const k = p * static_cast<std::size_t>(half_) + static_cast<std::size_t>(i);
      double const c = cos_[k], s = sign * sin_[k];
      double const a = double(x[i]), b = double(x[i + half_]);
      x[i] = static_cast<T>(a * c - b * s);
      x[i + half_] = static_cast<T>(b * c + a * s);
    }
  }

 private:
  std::int64_t half_;
  std::vector<double> cos_, sin_;
};

}  // namespace v0
}  // namespace moefold
