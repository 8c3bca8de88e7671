#pragma once
/// \file
/// The steps of Megatron's Sinkhorn balancing (moe/sinkhorn.hpp drives the iteration) as
/// bodies, all in double: the cost C = exp(logits), the row step d0[t] (a body per token sums
/// over experts) and the column step d1[e] (a body per expert sums over tokens, in token
/// order), both `SinkhornStep`; the mean change of d1 (one body, which also keeps d1 as the
/// next step's old value) and the result d1[e]·C[t,e]·d0[t].

#include <cmath>
#include <cstdint>

#include "moefold/core/hd.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// The guard Megatron adds to every row and column sum before dividing by it.
inline constexpr double kSinkhornEps = 1e-8;

/// cost[i] = exp(double(logits[i])).
template <class T>
struct SinkhornCost {
  T const* logits;
  double* cost;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    using std::exp;
    cost[i] = exp(static_cast<double>(logits[i]));
  }
};
/// One half-step, for every index i of one side (n of them): out[i] = (1/n) / (Σ_j other[j] ·
/// C[i·stride + j·other_stride] + eps), summed in j order. Rows: d0[t] from d1 (stride E,
/// other_stride 1); columns: d1[e] from d0 (stride 1, other_stride E, so in token order).
struct SinkhornStep {
  double const* cost;
  double const* other;
  double* out;
  std::int64_t n, other_n, stride, other_stride;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    double s = 0;
    for (std::int64_t j = 0; j < other_n; ++j) s += other[j] * cost[i * stride + j * other_stride];
    out[i] = (1.0 / static_cast<double>(n)) / (s + kSinkhornEps);
  }
};
/// change[0] = mean_e |d1_old[e] − d1[e]|, then d1_old = d1 (one body owns both).
struct SinkhornChange {
  double const* d1;
  double* d1_old;
  std::int64_t experts;
  double* change;
  MOEFOLD_HD void operator()(std::int64_t) const {
    using std::abs;
    double c = 0;
    for (std::int64_t e = 0; e < experts; ++e) c += abs(d1_old[e] - d1[e]);
    c /= static_cast<double>(experts);
    for (std::int64_t e = 0; e < experts; ++e) d1_old[e] = d1[e];
    change[0] = c;
  }
};
/// out[t, e] = T(d1[e]·C[t,e]·d0[t]).
template <class T>
struct SinkhornResult {
  double const* cost;
  double const* d0;
  double const* d1;
  std::int64_t experts;
  T* out;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    out[i] = static_cast<T>(d1[i % experts] * cost[i] * d0[i / experts]);
  }
};

}  // namespace ops
}  // namespace v0
}  // namespace moefold
