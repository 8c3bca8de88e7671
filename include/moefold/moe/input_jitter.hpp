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
///   moefold::apply_input_jitter<float>(exec, key, x, global_token_ids, hidden, 0.01, x);  // in
///   place
///
/// Megatron jitters whenever `moe_input_jitter_eps` is set, in evaluation as well as training
/// (its `apply_input_jitter` has no `self.training` check). moefold's router deliberately jitters
/// only training forwards and their recomputation, so evaluation stays deterministic (Megatron's
/// evaluation noise is fresh randomness, which no reference could match); pass eps = 0 for none.
///
/// The map is linear and diagonal, so its backward is the same call applied to the output
/// gradient: d_x = apply_input_jitter(key, d_out, ...).

#include <cstdint>
#include <type_traits>

#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/jitter.hpp"

namespace moefold {
inline namespace v0 {

/// Which noise one router call draws: the same key and token ids give the same noise on every
/// rank and in every folding. A global token index must be unique within a step, so `step`
/// must change between micro-batches unless token indices already count across them.
struct JitterKey {
  std::uint64_t seed = 0;       ///< the run's seed
  std::uint64_t step = 0;       ///< the training step (or micro-batch) the call belongs to
  std::uint64_t layer_key = 0;  ///< tells routers apart, e.g. the global layer number
};

/// The jitter factor of feature `feature` of global token `token` (ops/jitter.hpp).
using ops::jitter_factor;

/// Writes out[t·hidden + h] = x[t·hidden + h] · jitter_factor(key…, token_ids[t], h, eps) for
/// the row-major [token_ids.size(), hidden] input `x`; the product is formed in double and
/// rounded to `Real` once, so eps = 0 returns `x` exactly. `out` may alias `x`. The token ids
/// live in the instance's memory (checked on the host when it can read them).
///
/// Preconditions: hidden ≥ 1, `x.size() == out.size() == token_ids.size()·hidden`, eps ≥ 0,
/// every token id ≥ 0. Throws `moefold::error` (invalid_argument) otherwise.
template <class Real, class Exec>
void apply_input_jitter(
    Exec const& exec, JitterKey const& key,
    std::type_identity_t<View<Real const, typename Exec::memory_space>> x,
    std::type_identity_t<View<std::int64_t const, typename Exec::memory_space>> token_ids,
    std::int64_t hidden, double eps,
    std::type_identity_t<View<Real, typename Exec::memory_space>> out) {
  MOEFOLD_EXPECTS(hidden >= 1, "apply_input_jitter: hidden size {} must be at least 1", hidden);
  auto const n = token_ids.size() * hidden;
  MOEFOLD_EXPECTS(x.size() == n,
                  "apply_input_jitter: x holds {} values, but {} tokens × hidden {} need {}",
                  x.size(), token_ids.size(), hidden, n);
  MOEFOLD_EXPECTS(out.size() == n,
                  "apply_input_jitter: out holds {} values, but {} tokens × hidden {} need {}",
                  out.size(), token_ids.size(), hidden, n);
  MOEFOLD_EXPECTS(eps >= 0, "apply_input_jitter: eps {} must be ≥ 0", eps);
  MOEFOLD_EXPECTS(x.contiguous() && out.contiguous() && token_ids.contiguous(),
                  "apply_input_jitter: strided views");
  // Checked before writing anything, since `out` may alias `x`.
  if constexpr (Exec::memory_space::host_accessible)
    for (std::int64_t t = 0; t < token_ids.size(); ++t)
      MOEFOLD_EXPECTS(token_ids[t] >= 0, "apply_input_jitter: token id {} at row {} is negative",
                      token_ids[t], t);
  for_each(exec, n,
           ops::InputJitter<Real>{x.data(), token_ids.data(), hidden, key.seed, key.step,
                                  key.layer_key, eps, out.data()});
}

}  // namespace v0
}  // namespace moefold
