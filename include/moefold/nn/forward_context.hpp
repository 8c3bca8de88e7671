#pragma once
/// \file
/// `ForwardContext`: what a layer's forward is part of — a training forward, the recomputation of
/// one, or an evaluation — and the facts of the microbatch that layers with per-step state (the
/// MoE router's statistics, its auxiliary losses) need. Megatron reads the same facts from
/// `torch.is_grad_enabled()`, `module.training`, the tensor's shape and the schedule's global
/// aux-loss scale (spec §2.2, §3.3).
///
///   layer.forward(x, {.mode = ForwardMode::train, .batch = B, .microbatch = mb,
///                     .aux_loss_scale = aux_loss_gradient_scale(cp, M)});
///
/// Semantics that every layer with state follows (Megatron's, spec §2.2):
/// - `train`: the microbatch's scheduled forward. Statistics are counted here, exactly once per
///   microbatch and step; auxiliary losses are computed.
/// - `recompute`: activation recomputation of a microbatch whose `train` forward ran earlier in
///   the step. It replays that forward's reduced statistics: no collective for them and no
///   change of state, so its outputs and gradients equal the original's.
/// - `eval`: no auxiliary loss, no statistic, no state left behind.

#include <cstdint>
#include <span>

namespace moefold {
inline namespace v0 {

/// What a forward is part of.
enum class ForwardMode : std::uint8_t {
  train,      ///< a scheduled training forward: counts statistics once
  recompute,  ///< a recomputation of an earlier `train` forward of the same microbatch
  eval,       ///< evaluation: no auxiliary loss, no state change
};

/// The context of one forward (named fields: use designated initializers).
struct ForwardContext {
  ForwardMode mode = ForwardMode::train;
  /// B of this rank's `[S_loc, B]` token layout (token t = s·B + b). 0: not given; layers that
  /// need it (the sequence-level aux loss) refuse to run without it.
  std::int64_t batch = 0;
  /// The microbatch's index within the step, or −1 for a forward outside a scheduled step (then
  /// no statistics are kept for a later `recompute`).
  int microbatch = -1;
  /// The training iteration (a key of the router's input jitter).
  std::int64_t step = 0;
  /// The weight of the auxiliary losses' gradients in the following backward: Megatron's
  /// `loss_scale · CP / num_microbatches` (see `aux_loss_gradient_scale`).
  double aux_loss_scale = 1.0;
  /// The global index of each of this rank's tokens (T entries; stream sequence · S + position):
  /// a key of the router's input jitter, so that its noise is the same under every folding.
  std::span<std::int64_t const> token_index = {};
};

/// Megatron's weight of the auxiliary losses' gradients per microbatch (spec §2.2.1, §3.3):
/// `CP / M` normally — a rank's aux loss is its part of its replica's, and the gradient reduction
/// multiplies by 1/(DP·CP), which leaves the serial run's 1/(DP·M) — and 1 with
/// `calculate_per_token_loss`, where the router scales the attached loss by its token count
/// instead and the finalizer divides by the global token count.
inline double aux_loss_gradient_scale(int cp_size, int num_microbatches,
                                      bool calculate_per_token_loss = false) noexcept {
  return calculate_per_token_loss
             ? 1.0
             : static_cast<double>(cp_size) / static_cast<double>(num_microbatches);
}

}  // namespace v0
}  // namespace moefold
