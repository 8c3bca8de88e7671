#pragma once
/// \file
/// Expert activations: `SwiGLU` (gated: silu(gate) · up, fc1 holds [gate; up]) and `GeLU`
/// (exact, erf-based, as torch's default `F.gelu`). Each is a policy with `kGates` (the G of
/// fc1's `[G·F/ETP, H]` weight), a forward over one row and the matching backward.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <string_view>

namespace moefold {
inline namespace v0 {

/// silu(gate) · up over the two halves of an fc1 row: `h = [gate (f values); up (f values)]`.
struct SwiGLU {
  static constexpr int kGates = 2;
  static constexpr std::string_view name = "swiglu";

  /// out[j] = silu(h[j]) · h[f + j], j < f.
  template <class T>
  static void forward(T const* h, std::int64_t f, T* out) noexcept {
    for (std::int64_t j = 0; j < f; ++j) {
      T const g = h[j];
      T const s = T(1) / (T(1) + std::exp(-g));
      out[j] = g * s * h[f + j];
    }
  }
  /// dh (2f values) from d_out (f values) and the saved pre-activation h.
  template <class T>
  static void backward(T const* h, T const* d_out, std::int64_t f, T* dh) noexcept {
    for (std::int64_t j = 0; j < f; ++j) {
      T const g = h[j];
      T const s = T(1) / (T(1) + std::exp(-g));
      T const silu = g * s;
      dh[j] = d_out[j] * h[f + j] * s * (T(1) + g * (T(1) - s));
      dh[f + j] = d_out[j] * silu;
    }
  }
};

/// GeLU(x) = x · Φ(x), exact.
struct GeLU {
  static constexpr int kGates = 1;
  static constexpr std::string_view name = "gelu";

  template <class T>
  static void forward(T const* h, std::int64_t f, T* out) noexcept {
    for (std::int64_t j = 0; j < f; ++j)
      out[j] = h[j] * T(0.5) * (T(1) + std::erf(h[j] / std::numbers::sqrt2_v<T>));
  }
  template <class T>
  static void backward(T const* h, T const* d_out, std::int64_t f, T* dh) noexcept {
    T const inv_sqrt_2pi = T(1) / std::sqrt(T(2) * std::numbers::pi_v<T>);
    for (std::int64_t j = 0; j < f; ++j) {
      T const x = h[j];
      T const cdf = T(0.5) * (T(1) + std::erf(x / std::numbers::sqrt2_v<T>));
      T const pdf = inv_sqrt_2pi * std::exp(T(-0.5) * x * x);
      dh[j] = d_out[j] * (cdf + x * pdf);
    }
  }
};

/// An expert activation policy: `kGates` is 1 or 2, with a row forward and backward.
template <class A>
concept ExpertActivation = requires(float const* h, float const* d, float* out) {
  { A::kGates } -> std::convertible_to<int>;
  A::forward(h, std::int64_t{1}, out);
  A::backward(h, d, std::int64_t{1}, out);
} && (A::kGates == 1 || A::kGates == 2);

static_assert(ExpertActivation<SwiGLU> && ExpertActivation<GeLU>);

}  // namespace v0
}  // namespace moefold
