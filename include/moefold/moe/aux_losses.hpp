#pragma once
/// \file
/// The router's auxiliary losses (spec §2.2 steps 3 and 6): the switch load-balancing formula
/// behind `aux_loss`, `seq_aux_loss` and `global_aux_loss`, and the z-loss, each with its
/// gradient. The router (router.hpp) gathers the statistics over `tp_cp` / `tp_dp_cp`.

#include <cmath>
#include <cstdint>
#include <span>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// ∂switch/∂P[t, c] for every local token: `E·coeff / (K·Ttot²)` times `N[c]`.
inline double switch_loss_weight(std::int64_t num_experts, int topk, double total_tokens,
                                 double coeff) {
  MOEFOLD_EXPECTS(total_tokens > 0, "load-balancing loss over {} tokens", total_tokens);
  return static_cast<double>(num_experts) * coeff /
         (static_cast<double>(topk) * total_tokens * total_tokens);
}

/// Megatron's `switch_load_balancing_loss_func`:
/// `E·coeff / (K·Ttot²) · Σ_c prob_sums[c] · counts[c]`, where `prob_sums[c]` sums this rank's
/// scores of column c and `counts[c]` is the (reduced) number of tokens whose top-K holds c.
template <class Real, class Count>
double switch_load_balancing_loss(std::span<Real const> prob_sums, std::span<Count const> counts,
                                  std::int64_t num_experts, int topk, double total_tokens,
                                  double coeff) {
  MOEFOLD_EXPECTS(prob_sums.size() == counts.size(), "switch loss: {} score sums but {} counts",
                  prob_sums.size(), counts.size());
  double s = 0;
  for (std::size_t c = 0; c < counts.size(); ++c)
    s += static_cast<double>(prob_sums[c]) * static_cast<double>(counts[c]);
  return switch_loss_weight(num_experts, topk, total_tokens, coeff) * s;
}

/// z-loss: `(coeff / tp_cp_size) · mean_t (logsumexp_e logits[t, :])²` over `[T, E]` logits.
/// When `d_logits` is not empty, adds `scale · ∂z/∂logits` to it.
template <class Real>
double z_loss(std::span<Real const> logits, std::int64_t tokens, std::int64_t experts, double coeff,
              int tp_cp_size, std::span<Real> d_logits = {}, double scale = 1.0) {
  if (tokens == 0) return 0.0;
  double total = 0;
  double const c = coeff / tp_cp_size;
  for (std::int64_t t = 0; t < tokens; ++t) {
    auto const row =
        logits.subspan(static_cast<std::size_t>(t * experts), static_cast<std::size_t>(experts));
    double m = static_cast<double>(row[0]);
    for (Real v : row) m = std::max(m, static_cast<double>(v));
    double s = 0;
    for (Real v : row) s += std::exp(static_cast<double>(v) - m);
    double const lse = m + std::log(s);
    total += lse * lse;
    if (!d_logits.empty()) {
      // ∂/∂l_e of c·mean(lse²) = c · 2·lse/T · softmax_e.
      double const g = scale * c * 2.0 * lse / static_cast<double>(tokens);
      for (std::int64_t e = 0; e < experts; ++e)
        d_logits[static_cast<std::size_t>(t * experts + e)] += static_cast<Real>(
            g * std::exp(static_cast<double>(row[static_cast<std::size_t>(e)]) - m) / s);
    }
  }
  return c * total / static_cast<double>(tokens);
}

}  // namespace v0
}  // namespace moefold
