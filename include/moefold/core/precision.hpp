#pragma once
/// \file
/// The precision policy's types, as Megatron's `--bf16`: parameters and activations are stored
/// in `T`; every op accumulates in `compute_t<T>` (FP32 for BF16) and rounds once on store;
/// gradients of parameters are `grad_t<T>` (FP32 for BF16: Megatron's `main_grad`, accumulated
/// over microbatches and reduced over the data-parallel ranks in FP32).
///
///   compute_t<T> acc = 0;
///   for (…) acc += widen(x[i]) * widen(w[i]);   // FP32 sums of BF16 operands
///   y[r] = narrow<T>(acc);                       // rounded once

#include <string_view>
#include <type_traits>

#include "moefold/core/bf16.hpp"
#include "moefold/core/hd.hpp"

namespace moefold {
inline namespace v0 {

/// The type ops compute and accumulate in for elements of type `T`: float for bf16, `T` itself
/// otherwise (float, double).
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, bf16>, float, T>;

/// The type of parameter gradients of a model in `T` (Megatron's main_grad).
template <class T>
using grad_t = compute_t<T>;

/// Whether `T` is a reduced-precision storage type whose optimizer keeps FP32 main parameters.
template <class T>
inline constexpr bool has_main_params_v = !std::is_same_v<compute_t<T>, T>;

/// `x` in its compute type.
template <class T>
MOEFOLD_HD constexpr compute_t<T> widen(T x) noexcept {
  return static_cast<compute_t<T>>(x);
}
/// `x` rounded to the storage type `T` (a no-op unless `T` is narrower).
template <class T, class C>
MOEFOLD_HD constexpr T narrow(C x) noexcept {
  if constexpr (std::is_same_v<T, bf16>)
    return T(static_cast<float>(x));
  else
    return static_cast<T>(x);
}

/// The precision policy a training run picks (`moefold-train --bf16`).
enum class Precision : unsigned char { fp32, bf16 };

constexpr std::string_view name(Precision p) noexcept {
  return p == Precision::bf16 ? "bf16" : "fp32";
}

}  // namespace v0
}  // namespace moefold
