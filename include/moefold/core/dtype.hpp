#pragma once
/// \file
/// Element types that moefold moves between ranks, as a runtime tag.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "moefold/core/bf16.hpp"

namespace moefold {
inline namespace v0 {

/// The element types of tensors and messages.
enum class DType : std::uint8_t { f32, f64, bf16, i32, i64, u8 };

/// Types a communicator can carry: float, double, bf16, int32, int64 (and bytes).
template <class T>
concept CommScalar = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                     std::is_same_v<T, bf16> || std::is_same_v<T, std::int32_t> ||
                     std::is_same_v<T, std::int64_t> || std::is_same_v<T, std::uint8_t>;

/// The tag of `T`.
template <CommScalar T>
constexpr DType dtype_of() noexcept {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, double>) return DType::f64;
  else if constexpr (std::is_same_v<T, bf16>) return DType::bf16;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::i32;
  else if constexpr (std::is_same_v<T, std::int64_t>) return DType::i64;
  else return DType::u8;
}

/// Bytes per element.
constexpr std::size_t size_of(DType t) noexcept {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  return 0;
}

/// The type's name in messages.
constexpr std::string_view name(DType t) noexcept {
  switch (t) {
    case DType::f32: return "float";
    case DType::f64: return "double";
    case DType::bf16: return "bf16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
  }
  return "?";
}

namespace detail {
/// Converts one stored element of type `d` at `p` to `T`.
template <class T>
T element_as(DType d, char const* p) {
  auto const cast = [](auto v) -> T {
    if constexpr (std::is_same_v<T, bf16>)
      return bf16(static_cast<float>(v));
    else
      return static_cast<T>(v);
  };
  auto const load = [p](auto v) {
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  switch (d) {
    case DType::f32:
      return cast(load(float{}));
    case DType::f64:
      return cast(load(double{}));
    case DType::bf16:
      return cast(static_cast<float>(load(bf16{})));
    case DType::i32:
      return cast(load(std::int32_t{}));
    case DType::i64:
      return cast(load(std::int64_t{}));
    case DType::u8:
      return cast(load(std::uint8_t{}));
  }
  return T{};
}
}  // namespace detail

}  // namespace v0
}  // namespace moefold
