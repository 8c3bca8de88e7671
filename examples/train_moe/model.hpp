#pragma once
// The model of the demo: a DecoderStage (include/moefold/train/decoder_stage.hpp) whose MLP slot
// is chosen here — the one place that maps the command line onto the MLP block's config.

#include <string>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/exec/cpu.hpp"
#include "moefold/exec/shuffled_cpu.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/plan/flops.hpp"
#include "moefold/train/decoder_stage.hpp"
#include "options.hpp"
#include "phase_times.hpp"
#include "timed_dispatcher.hpp"

#ifndef MOEFOLD_TEST_EXEC
#define MOEFOLD_TEST_EXEC ::moefold::Cpu
#endif

namespace moefold::train_demo {

/// The execution instance of every layer: `Cpu` (a build with MOEFOLD_TEST_EXECUTION=ShuffledCpu
/// runs the demo on the order-scrambling test instance instead).
using Exec = MOEFOLD_TEST_EXEC;

/// The MLP slot of every decoder layer: Megatron's MoE block (top-k router computing in `R`:
/// FP32 — with bf16 logits under --bf16 unless --moe-router-dtype fp32 — or FP64 with
/// --moe-router-dtype fp64; its score function the command line picks), dropless all-to-all
/// dispatcher, SwiGLU grouped-GEMM experts, optional shared expert), timed for the summary's
/// phases.
template <class T, Communicator Comm, class R = compute_t<T>>
using MlpBlock = TimedBlock<
    MoELayer<Exec, TopKRouter<Exec, ConfiguredScore, R>,
             TimedDispatcher<AllToAllDispatcher<Dropless>>,
             GroupedGemmExperts<Exec, SwiGLU, BlasGroupedGemm, T>, Comm>>;

/// The MLP slot's config from the command line (EP and ETP come from the folding).
template <class T, Communicator Comm>
typename MlpBlock<T, Comm>::Config mlp_config(TrainOptions const& o) {
  MoELayerConfig c;
  c.hidden_size = o.hidden;
  c.moe_ffn_hidden_size = o.moe_ffn;
  c.moe_shared_expert_intermediate_size = o.shared_expert_ffn;
  c.moe_shared_expert_overlap = o.shared_expert_overlap;
  c.router = router_config(o);
  c.seed = o.seed;
  return c;
}

/// One line for the banner.
inline std::string mlp_description(TrainOptions const& o) {
  return fmt::format(
      "MoE {} experts top-{} ({} router{}, {}{}{}), expert FFN {}{}, dropless all-to-all",
      o.num_experts, o.topk, o.score_function,
      !o.router_dtype.empty() ? " in " + o.router_dtype : o.bf16 ? " with bf16 logits" : "",
      fmt::join(o.load_balancing, " + "),
      o.z_loss_coeff ? ", z-loss" : "", o.expert_bias ? ", expert bias" : "", o.moe_ffn,
      o.shared_expert_ffn > 0 ? fmt::format(", shared expert {}", o.shared_expert_ffn)
                              : std::string());
}

template <class T, Communicator Comm, class R = compute_t<T>>
using Model = DecoderStage<Exec, T, Comm, MlpBlock<T, Comm, R>>;

inline DecoderModelConfig model_config(TrainOptions const& o) {
  return {.vocab = o.padded_vocab(),
          .hidden = o.hidden,
          .num_layers = o.num_layers,
          .heads = o.heads,
          .kv_groups = o.kv_groups,
          .seq = o.seq,
          .micro_batch = o.micro_batch,
          .norm_eps = o.norm_epsilon,
          .rope_base = o.rotary_base,
          .add_qkv_bias = o.add_qkv_bias,
          .seed = o.seed,
          .calculate_per_token_loss = o.calculate_per_token_loss,
          .check_activations_and_grads = o.check_activations_and_grads,
          .recompute_granularity = o.recompute_granularity == "full"
                                       ? RecomputeGranularity::full
                                       : RecomputeGranularity::none};
}

/// The model as the planner describes it, for Megatron's FLOPs formula (MFU in the summary).
inline ModelSpec model_spec(TrainOptions const& o) {
  ModelSpec m;
  m.name = "moefold-train";
  m.num_layers = o.num_layers;
  m.hidden_size = o.hidden;
  m.num_attention_heads = o.heads;
  m.num_query_groups = o.kv_groups > 0 ? o.kv_groups : o.heads;
  m.moe_ffn_hidden_size = o.moe_ffn;
  m.num_experts = o.num_experts;
  m.moe_router_topk = o.topk;
  m.shared_expert_ffn_hidden_size = o.shared_expert_ffn;
  m.vocab_size = static_cast<int>(o.padded_vocab());
  m.seq_length = o.seq;
  return m;
}

/// Model FLOPs of one training step (Megatron's `num_floating_point_operations`; the vocabulary
/// is the model's own, already padded).
inline double model_flops_per_step(TrainOptions const& o) {
  return megatron_flops_per_step(model_spec(o), o.global_batch, o.seq);
}

}  // namespace moefold::train_demo
