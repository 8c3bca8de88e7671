#pragma once
/// \file
/// The router's input jitter as an element body: `jitter_factor` (a pure function of seed,
/// step, layer, global token and feature; moe/input_jitter.hpp documents it) and `InputJitter`,
/// out[t·H + h] = x[t·H + h] · factor(token_ids[t], h), formed in double and rounded once.

#include <cstdint>

#include "moefold/core/hd.hpp"
#include "moefold/core/init.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

namespace detail {
/// Separates the jitter's random stream from every other user of `mix64` under the same seed.
inline constexpr std::uint64_t kJitterDomain =
    moefold::detail::hash_name("moefold.moe.input_jitter");
}  // namespace detail

/// The jitter factor of feature `feature` of global token `token`: uniform in
/// [1 − eps, 1 + eps] over the key (53 random bits), exactly 1 when eps = 0. Changing any one of
/// the five key components changes the underlying 64-bit hash (each step of the chain is a
/// bijection of the previous one).
MOEFOLD_HD constexpr double jitter_factor(std::uint64_t seed, std::uint64_t step,
                                          std::uint64_t layer_key, std::uint64_t token,
                                          std::uint64_t feature, double eps) noexcept {
  using moefold::detail::mix64;
  std::uint64_t h = mix64(seed ^ detail::kJitterDomain);
  h = mix64(h ^ step);
  h = mix64(h ^ layer_key);
  h = mix64(h ^ token);
  h = mix64(h ^ feature);
  return 1.0 + eps * (2.0 * moefold::detail::unit(h) - 1.0);  // 2u − 1 ∈ [−1, 1), exact
}

/// out[i] = T(double(x[i]) · jitter_factor(seed, step, layer, token_ids[i / H], i mod H, eps)).
template <class T>
struct InputJitter {
  T const* x;
  std::int64_t const* token_ids;
  std::int64_t hidden;
  std::uint64_t seed, step, layer_key;
  double eps;
  T* out;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    auto const token = static_cast<std::uint64_t>(token_ids[i / hidden]);
    auto const h = static_cast<std::uint64_t>(i % hidden);
    double const f = jitter_factor(seed, step, layer_key, token, h, eps);
    out[i] = static_cast<T>(static_cast<double>(x[i]) * f);
  }
};

}  // namespace ops
}  // namespace v0
}  // namespace moefold
