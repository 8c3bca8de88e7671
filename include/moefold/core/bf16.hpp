#pragma once
/// \file
/// `bf16`: the bfloat16 storage type (the upper 16 bits of an IEEE float), with
/// round-to-nearest-even conversion from float. Arithmetic happens in float (core/precision.hpp:
/// `compute_t<bf16>` is float); the conversions run on the host and, under nvcc, on the device.

#include <cstdint>

#include "moefold/core/hd.hpp"

namespace moefold {
inline namespace v0 {

/// bfloat16 storage: 1 sign, 8 exponent, 7 mantissa bits.
struct bf16 {
  std::uint16_t bits = 0;

  constexpr bf16() = default;
  /// Rounds `f` to the nearest bf16, ties to even; NaN stays NaN.
  MOEFOLD_HD constexpr explicit bf16(float f) noexcept : bits(round(f)) {}
  /// The exact float value.
  MOEFOLD_HD constexpr explicit operator float() const noexcept {
    return __builtin_bit_cast(float, static_cast<std::uint32_t>(static_cast<std::uint32_t>(bits) << 16));
  }
  MOEFOLD_HD constexpr bool operator==(bf16 const& o) const noexcept { return bits == o.bits; }

 private:
  MOEFOLD_HD static constexpr std::uint16_t round(float f) noexcept {
    std::uint32_t const u = __builtin_bit_cast(std::uint32_t, f);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0)
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    std::uint32_t const lsb = (u >> 16) & 1u;
    return static_cast<std::uint16_t>((u + 0x7fffu + lsb) >> 16);
  }
};
static_assert(sizeof(bf16) == 2);

}  // namespace v0
}  // namespace moefold
