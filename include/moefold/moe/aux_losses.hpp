#pragma once
/// \file
/// The router's auxiliary losses (spec §2.2 steps 3 and 6): the switch load-balancing formula
/// behind `aux_loss`, `seq_aux_loss` and `global_aux_loss`, and the z-loss, each with its
/// gradient. The router (router.hpp) gathers the statistics over `tp_cp` / `tp_dp_cp`.

#include <cstdint>
#include <span>

#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/ops/aux_loss.hpp"

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

/// z-loss: `(coeff / tp_cp_size) · mean_t (logsumexp_e logits[t, :])²` over `[T, E]` logits,
/// the logsumexp rows and their sum as bodies on `exec`. `workspace` (T + 1 doubles, allocated
/// here when its size differs) is reused across calls.
template <class Real, class Exec>
double z_loss(Exec const& exec, View<Real const, typename Exec::memory_space> logits, double coeff,
              int tp_cp_size, Buffer<double, typename Exec::memory_space>& workspace) {
  std::int64_t const tokens = logits.rows();
  if (tokens == 0) return 0.0;
  if (static_cast<std::int64_t>(workspace.size()) != tokens + 1)
    workspace = exec.template allocate<double>(tokens + 1);
  auto const ws = workspace.view();
  ops::logsumexp_squares(exec, logits, ws.cols(0, tokens), ws.cols(tokens, 1));
  double total = 0;
  copy<double>(exec, ws.cols(tokens, 1), View<double>(&total, 1));
  double const c = coeff / tp_cp_size;
  return c * total / static_cast<double>(tokens);
}

/// Adds `scale · ∂z/∂logits` of `z_loss` to `d_logits` `[T, E]`.
template <class Real, class Exec>
void z_loss_backward(Exec const& exec, View<Real const, typename Exec::memory_space> logits,
                     double coeff, int tp_cp_size, double scale,
                     View<Real, typename Exec::memory_space> d_logits) {
  if (logits.rows() == 0) return;
  ops::z_loss_backward(exec, logits, coeff / tp_cp_size, scale, d_logits);
}

}  // namespace v0
}  // namespace moefold
