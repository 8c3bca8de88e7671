#pragma once
/// \file
/// Router input jitter (Switch Transformer, arXiv:2101.03961), Megatron-Core's
/// `moe_input_jitter_eps`: before the gating GEMM, the router input is multiplied elementwise by
/// noise uniform in [1 − eps, 1 + eps]. Megatron draws the noise from torch's generator, so it
/// depends on the rank, the folding and the order of calls; ours is a pure function of
/// (seed, step, layer, global token index, feature index), built from the house hash
/// (`detail::mix64`), so every folding, and an activation recomputation, sees the same noise:
///
///   moefold::JitterKey const key{.seed = run_seed, .step = step, .layer_key = layer_number};
///   moefold::apply_input_jitter<float>(key, x, global_token_ids, hidden, 0.01, x);  // in place
///
/// Megatron jitters whenever `moe_input_jitter_eps` is set, in evaluation as well as training
/// (its `apply_input_jitter` has no `self.training` check). moefold's router deliberately jitters
/// only training forwards and their recomputation, so evaluation stays deterministic (Megatron's
/// evaluation noise is fresh randomness, which no reference could match); pass eps = 0 for none.
///
/// The map is linear and diagonal, so its backward is the same call applied to the output
/// gradient: d_x = apply_input_jitter(key, d_out, ...).

#include <cstdint>
#include <span>

#include "moefold/core/error.hpp"
#include "moefold/core/init.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
/// Separates the jitter's random stream from every other user of `mix64` under the same seed.
inline constexpr std::uint64_t kJitterDomain = hash_name("moefold.moe.input_jitter");
}  // namespace detail

/// Which noise one router call draws: the same key and token ids give the same noise on every
/// rank and in every folding. A global token index must be unique within a step, so `step`
/// must change between micro-batches unless token indices already count across them.
struct JitterKey {
  std::uint64_t seed = 0;       ///< the run's seed
  std::uint64_t step = 0;       ///< the training step (or micro-batch) the call belongs to
  std::uint64_t layer_key = 0;  ///< tells routers apart, e.g. the global layer number
};

/// The jitter factor of feature `feature` of global token `token`: uniform in
/// [1 − eps, 1 + eps] over the key (53 random bits), exactly 1 when eps = 0. Changing any one of
/// the five key components changes the underlying 64-bit hash (each step of the chain is a
/// bijection of the previous one).
constexpr double jitter_factor(std::uint64_t seed, std::uint64_t step, std::uint64_t layer_key,
                               std::uint64_t token, std::uint64_t feature, double eps) noexcept {
  std::uint64_t h = detail::mix64(seed ^ detail::kJitterDomain);
  h = detail::mix64(h ^ step);
  h = detail::mix64(h ^ layer_key);
  h = detail::mix64(h ^ token);
  h = detail::mix64(h ^ feature);
  return 1.0 + eps * (2.0 * detail::unit(h) - 1.0);  // 2u − 1 ∈ [−1, 1), exact
}

/// Writes out[t·hidden + h] = x[t·hidden + h] · jitter_factor(key…, token_ids[t], h, eps) for
/// the row-major [token_ids.size(), hidden] input `x`; the product is formed in double and
/// rounded to `Real` once, so eps = 0 returns `x` exactly. `out` may alias `x`.
///
/// Preconditions: hidden ≥ 1, `x.size() == out.size() == token_ids.size()·hidden`, eps ≥ 0,
/// every token id ≥ 0. Throws `moefold::error` (invalid_argument) otherwise.
template <class Real>
void apply_input_jitter(JitterKey const& key, std::span<Real const> x,
                        std::span<std::int64_t const> token_ids, std::int64_t hidden, double eps,
                        std::span<Real> out) {
  MOEFOLD_EXPECTS(hidden >= 1, "apply_input_jitter: hidden size {} must be at least 1", hidden);
  auto const h_count = static_cast<std::size_t>(hidden);
  auto const n = token_ids.size() * h_count;
  MOEFOLD_EXPECTS(x.size() == n,
                  "apply_input_jitter: x holds {} values, but {} tokens × hidden {} need {}",
                  x.size(), token_ids.size(), hidden, n);
  MOEFOLD_EXPECTS(out.size() == n,
                  "apply_input_jitter: out holds {} values, but {} tokens × hidden {} need {}",
                  out.size(), token_ids.size(), hidden, n);
  MOEFOLD_EXPECTS(eps >= 0, "apply_input_jitter: eps {} must be ≥ 0", eps);
  // Checked before writing anything, since `out` may alias `x`.
  for (std::size_t t = 0; t < token_ids.size(); ++t)
    MOEFOLD_EXPECTS(token_ids[t] >= 0, "apply_input_jitter: token id {} at row {} is negative",
                    token_ids[t], t);
  for (std::size_t t = 0; t < token_ids.size(); ++t) {
    auto const token = static_cast<std::uint64_t>(token_ids[t]);
    for (std::size_t h = 0; h < h_count; ++h) {
      double const f = jitter_factor(key.seed, key.step, key.layer_key, token, h, eps);
      out[t * h_count + h] = static_cast<Real>(static_cast<double>(x[t * h_count + h]) * f);
    }
  }
}

}  // namespace v0
}  // namespace moefold
