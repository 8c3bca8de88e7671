#pragma once
/// \file
/// A per-token sigmoid gate σ(x·g) (the MoE shared expert's gate, spec §2.8) and its backward:
///
///   ops::row_gate(exec, x, g, gate);                 // gate[t] = σ(⟨x[t], g⟩)
///   ops::row_gate_backward(exec, dy, s, gate, g, d_s, dz, dx);   // per token
///   ops::row_gate_weight_grad(exec, dz, x, dg);      // dg[j] += Σ_t dz[t] · x[t, j]
///
/// where the gated output is y += s · gate (s: the gated rows).

#include <cstdint>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/row_scale.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// gate[t] = σ(Σ_j x[t, j] · g[j]), j ascending.
template <class T>
struct RowGate {
  T const* x;
  T const* g;
  T* gate;
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t t) const {
    compute_t<T> z{};
    for (std::int64_t j = 0; j < h; ++j) z += widen(x[t * h + j]) * widen(g[j]);
    gate[t] = narrow<T>(sigmoid(z));
  }
};

/// Token t of y += s · σ(z): d_s = dy · σ; dz = (Σ_j dy · s) · σ(1 − σ); dx += dz · g.
template <class T>
struct RowGateBackward {
  T const* dy;
  T const* s;
  T const* gate;
  T const* g;
  T* d_s;
  T* dz;
  T* dx;
  std::int64_t h;
  MOEFOLD_HD void operator()(std::int64_t t) const {
    using C = compute_t<T>;
    C const gt = widen(gate[t]);
    C acc = scale_row_backward(dy + t * h, s + t * h, gate[t], d_s + t * h, h);
    acc *= gt * (C(1) - gt);
    for (std::int64_t j = 0; j < h; ++j)
      dx[t * h + j] = narrow<T>(widen(dx[t * h + j]) + acc * widen(g[j]));
    dz[t] = narrow<T>(acc);
  }
};

/// dg[j] += Σ_t dz[t] · x[t, j], t ascending.
template <class T, class G = T>
struct RowGateWeightGrad {
  T const* dz;
  T const* x;
  G* dg;  ///< grad_t<T>
  std::int64_t tokens, h;
  MOEFOLD_HD void operator()(std::int64_t j) const {
    for (std::int64_t t = 0; t < tokens; ++t) dg[j] += widen(dz[t]) * widen(x[t * h + j]);
  }
};

/// gate [T] = σ(x [T, H] · g [H]).
template <class Exec, class T>
void row_gate(Exec const& exec, View<T const, typename Exec::memory_space> x,
              View<T const, typename Exec::memory_space> g, View<T, typename Exec::memory_space> gate) {
  MOEFOLD_EXPECTS(x.contiguous() && g.size() == x.cols() && gate.size() == x.rows(),
                  "ops::row_gate: x {}×{}, g of {}, gate of {}", x.rows(), x.cols(), g.size(),
                  gate.size());
  for_each_row(exec, x.rows(), RowGate<T>{x.data(), g.data(), gate.data(), x.cols()});
}

/// From dy [T, H], the gated rows s [T, H], the gate [T] and g [H]: d_s [T, H], dz [T], and
/// dx [T, H] += dz · g.
template <class Exec, class T>
void row_gate_backward(Exec const& exec, View<T const, typename Exec::memory_space> dy,
                       View<T const, typename Exec::memory_space> s,
                       View<T const, typename Exec::memory_space> gate,
                       View<T const, typename Exec::memory_space> g,
                       View<T, typename Exec::memory_space> d_s,
                       View<T, typename Exec::memory_space> dz,
                       View<T, typename Exec::memory_space> dx) {
  std::int64_t const h = g.size(), tokens = gate.size();
  MOEFOLD_EXPECTS(dy.size() == tokens * h && s.size() == tokens * h && d_s.size() == tokens * h &&
                      dx.size() == tokens * h && dz.size() == tokens,
                  "ops::row_gate_backward: {} tokens of {}: dy {}, s {}, d_s {}, dx {}, dz {}",
                  tokens, h, dy.size(), s.size(), d_s.size(), dx.size(), dz.size());
  for_each_row(exec, tokens,
               RowGateBackward<T>{dy.data(), s.data(), gate.data(), g.data(), d_s.data(), dz.data(),
                                  dx.data(), h});
}

/// dg [H] += dzᵀ · x.
template <class Exec, class T>
void row_gate_weight_grad(Exec const& exec, View<T const, typename Exec::memory_space> dz,
                          View<T const, typename Exec::memory_space> x,
                          std::type_identity_t<View<grad_t<T>, typename Exec::memory_space>> dg) {
  MOEFOLD_EXPECTS(x.size() == dz.size() * dg.size(),
                  "ops::row_gate_weight_grad: x of {} for {} tokens × {}", x.size(), dz.size(),
                  dg.size());
  for_each(exec, dg.size(),
           RowGateWeightGrad<T, grad_t<T>>{dz.data(), x.data(), dg.data(), dz.size(), dg.size()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
