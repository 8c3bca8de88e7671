#pragma once
/// \file
/// The MLP activations as element bodies, shared by the dense MLP (nn/dense_mlp.hpp) and the
/// grouped experts (moe/grouped_gemm_experts.hpp): `SwiGLU` (gated: silu(gate) · up, fc1's
/// output row holds [gate (f values); up (f values)]) and `GeLU` (exact, erf-based, as torch's
/// default `F.gelu`). A policy has `kGates` (the G of fc1's `[G·f, H]` weight) and element
/// functions over column j of one row; `activation_forward` / `activation_backward` launch them
/// over `[rows, G·f]` pre-activations. bf16 elements are computed in FP32 (`compute_t`) and
/// rounded once on store.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <string_view>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"

namespace moefold {
inline namespace v0 {

/// silu(gate) · up.
struct SwiGLU {
  static constexpr int kGates = 2;
  static constexpr std::string_view name = "swiglu";

  /// out[j] = silu(h[j]) · h[f + j] (h: one row of 2f pre-activations).
  template <class T>
  MOEFOLD_HD static void forward(T const* h, std::int64_t f, std::int64_t j, T* out) {
    using C = compute_t<T>;
    C const g = widen(h[j]);
    C const s = ops::sigmoid(g);
    out[j] = narrow<T>(g * s * widen(h[f + j]));
  }
  /// dh[j], dh[f + j] from d_out[j] and the saved pre-activations.
  template <class T>
  MOEFOLD_HD static void backward(T const* h, T const* d_out, std::int64_t f, std::int64_t j,
                                  T* dh) {
    using C = compute_t<T>;
    C const g = widen(h[j]);
    C const s = ops::sigmoid(g);
    C const silu = g * s;
    dh[j] = narrow<T>(widen(d_out[j]) * widen(h[f + j]) * s * (C(1) + g * (C(1) - s)));
    dh[f + j] = narrow<T>(widen(d_out[j]) * silu);
  }
};

/// GeLU(x) = x · Φ(x), exact.
struct GeLU {
  static constexpr int kGates = 1;
  static constexpr std::string_view name = "gelu";

  template <class T>
  MOEFOLD_HD static void forward(T const* h, std::int64_t, std::int64_t j, T* out) {
    using std::erf;
    using C = compute_t<T>;
    C const x = widen(h[j]);
    out[j] = narrow<T>(x * C(0.5) * (C(1) + erf(x / std::numbers::sqrt2_v<C>)));
  }
  template <class T>
  MOEFOLD_HD static void backward(T const* h, T const* d_out, std::int64_t, std::int64_t j,
                                  T* dh) {
    using std::erf;
    using std::exp;
    using std::sqrt;
    using C = compute_t<T>;
    C const inv_sqrt_2pi = C(1) / sqrt(C(2) * std::numbers::pi_v<C>);
    C const x = widen(h[j]);
    C const cdf = C(0.5) * (C(1) + erf(x / std::numbers::sqrt2_v<C>));
    C const pdf = inv_sqrt_2pi * exp(C(-0.5) * x * x);
    dh[j] = narrow<T>(widen(d_out[j]) * (cdf + x * pdf));
  }
};

/// An activation policy: `kGates` is 1 or 2, with element forward and backward.
template <class A>
concept ExpertActivation = requires(float const* h, float const* d, float* out) {
  { A::kGates } -> std::convertible_to<int>;
  A::forward(h, std::int64_t{1}, std::int64_t{0}, out);
  A::backward(h, d, std::int64_t{1}, std::int64_t{0}, out);
} && (A::kGates == 1 || A::kGates == 2);

static_assert(ExpertActivation<SwiGLU> && ExpertActivation<GeLU>);

namespace ops {

/// out[r, j] = act(h[r, ·])[j] over rows of G·f pre-activations.
template <class Act, class T>
struct ActivationForward {
  T const* h;
  T* out;
  std::int64_t f;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const r = i / f, j = i % f;
    Act::forward(h + r * Act::kGates * f, f, j, out + r * f);
  }
};
/// dh[r, ·] from d_out[r, j] and h.
template <class Act, class T>
struct ActivationBackward {
  T const* h;
  T const* d_out;
  T* dh;
  std::int64_t f;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const r = i / f, j = i % f;
    Act::backward(h + r * Act::kGates * f, d_out + r * f, f, j, dh + r * Act::kGates * f);
  }
};

/// out [rows, f] = Act(h [rows, G·f]).
template <ExpertActivation Act, class Exec, class T>
void activation_forward(Exec const& exec,
                        std::type_identity_t<View<T const, typename Exec::memory_space>> h,
                        View<T, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(h.contiguous() && out.contiguous() && h.rows() == out.rows() &&
                      h.cols() == Act::kGates * out.cols(),
                  "ops::activation_forward ({}): pre-activations {}×{} for outputs {}×{}",
                  Act::name, h.rows(), h.cols(), out.rows(), out.cols());
  for_each(exec, out.size(), ActivationForward<Act, T>{h.data(), out.data(), out.cols()});
}
/// dh [rows, G·f] from d_out [rows, f] and the saved h.
template <ExpertActivation Act, class Exec, class T>
void activation_backward(Exec const& exec,
                         std::type_identity_t<View<T const, typename Exec::memory_space>> h,
                         std::type_identity_t<View<T const, typename Exec::memory_space>> d_out,
                         View<T, typename Exec::memory_space> dh) {
  MOEFOLD_EXPECTS(h.contiguous() && d_out.contiguous() && dh.contiguous() &&
                      h.rows() == d_out.rows() && dh.rows() == h.rows() &&
                      h.cols() == Act::kGates * d_out.cols() && dh.cols() == h.cols(),
                  "ops::activation_backward ({}): h {}×{}, d_out {}×{}, dh {}×{}", Act::name,
                  h.rows(), h.cols(), d_out.rows(), d_out.cols(), dh.rows(), dh.cols());
  for_each(exec, d_out.size(),
           ActivationBackward<Act, T>{h.data(), d_out.data(), dh.data(), d_out.cols()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
