#pragma once
/// \file
/// Model FLOPs per training step by Megatron-Core v0.10's `num_floating_point_operations`
/// (spec/paper.md §4.11): full (not causal-halved) attention, router not counted, padded
/// vocabulary. This is the numerator of the paper's MFU.

#include "moefold/plan/model.hpp"

namespace moefold {
inline namespace v0 {

/// Model FLOPs of one step on `global_batch_size` sequences of `seq_length` tokens:
///
///   12·B·s·L·h²·[ (1 + g/a + s/h)·(a·d/h) + (F/h)·k·m + (F_shared/h)·m + V/(2·L·h) ]
///
/// with m = 3/2 for SwiGLU (1 otherwise) and V the vocabulary padded for `tp`.
inline double megatron_flops_per_step(ModelSpec const& model, long global_batch_size,
                                      long seq_length, int tp = 1) {
  double const B = double(global_batch_size), s = double(seq_length);
  double const L = model.num_layers, h = model.hidden_size;
  double const a = model.num_attention_heads, g = model.num_query_groups, d = model.head_dim();
  double const m = model.swiglu ? 1.5 : 1.0;
  double const V = double(model.padded_vocab(tp));
  double const bracket = (1.0 + g / a + s / h) * (a * d / h) +
                         double(model.moe_ffn_hidden_size) / h * model.moe_router_topk * m +
                         double(model.shared_expert_ffn_hidden_size) / h * m + V / (2.0 * L * h);
  return 12.0 * B * s * L * h * h * bracket;
}

}  // namespace v0
}  // namespace moefold
