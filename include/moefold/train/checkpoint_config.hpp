#pragma once
/// \file
/// The settings a checkpoint records for moefold's own configurations, under Megatron's names:
/// the folding, `DecoderModelConfig` and the MoE layer's `MoELayerConfig` / `RouterConfig`.
/// `model` settings (what the weights mean: shapes, routing) are checked on load; `run`
/// settings (seed, batch, loss coefficients) are recorded only. A trainer with its own model
/// fills `ConfigEntries` alike.

#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/mesh/folded_mapping.hpp"
#include "moefold/moe/moe_layer.hpp"
#include "moefold/moe/router_config.hpp"
#include "moefold/train/checkpoint_metadata.hpp"
#include "moefold/train/decoder_stage.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
/// `v` joined by commas ("none" when empty): one token.
template <class V>
std::string joined(V const& v) {
  return v.empty() ? std::string("none") : fmt::format("{}", fmt::join(v, ","));
}
}  // namespace detail

/// The folding's sizes (world_size, tp, cp, pp, dp, ep, etp, edp) and rank order.
inline ConfigEntries folding_entries(FoldedMapping const& f) {
  ConfigEntries e;
  e.set("world_size", f.world_size()).set("tp", f.tp()).set("cp", f.cp()).set("pp", f.pp());
  e.set("dp", f.dp()).set("ep", f.ep()).set("etp", f.etp()).set("edp", f.edp());
  return e.set("order", f.order());
}

/// Adds the decoder's settings to `info`: its shapes to `model`, the rest to `run`.
inline void add_config(CheckpointInfo& info, DecoderModelConfig const& c) {
  info.model.set("padded_vocab_size", c.vocab)
      .set("hidden_size", c.hidden)
      .set("num_layers", c.num_layers)
      .set("num_attention_heads", c.heads)
      .set("num_query_groups", c.kv_groups > 0 ? c.kv_groups : c.heads)
      .set("norm_epsilon", c.norm_eps)
      .set("rotary_base", c.rope_base)
      .set("add_qkv_bias", c.add_qkv_bias);
  info.run.set("seq_length", c.seq)
      .set("micro_batch_size", c.micro_batch)
      .set("seed", c.seed)
      .set("init_method_std", c.init_scale)
      .set("calculate_per_token_loss", c.calculate_per_token_loss);
}

/// Adds the MoE layer's settings to `info`: its shapes and routing to `model`, its losses,
/// token dropping and balancing rates to `run`.
inline void add_config(CheckpointInfo& info, MoELayerConfig const& c) {
  RouterConfig const& r = c.router;
  std::vector<std::string_view> types;
  for (auto t : r.moe_router_load_balancing_type) types.push_back(name(t));
  info.model.set("hidden_size", c.hidden_size)
      .set("num_moe_experts", r.num_experts)
      .set("moe_ffn_hidden_size", c.moe_ffn_hidden_size)
      .set("moe_shared_expert_intermediate_size", c.moe_shared_expert_intermediate_size)
      .set("moe_shared_expert_gate", c.moe_shared_expert_gate)
      .set("moe_router_topk", r.moe_router_topk)
      .set("moe_router_score_function", name(r.moe_router_score_function))
      .set("moe_router_pre_softmax", r.moe_router_pre_softmax)
      .set("moe_router_num_groups", r.moe_router_num_groups)
      .set("moe_router_group_topk", r.moe_router_group_topk)
      .set("moe_router_topk_scaling_factor", r.moe_router_topk_scaling_factor)
      .set("moe_router_enable_expert_bias", r.moe_router_enable_expert_bias);
  info.run.set("moe_router_load_balancing_type", detail::joined(types))
      .set("moe_aux_loss_coeff", detail::joined(r.moe_aux_loss_coeff))
      .set("moe_z_loss_coeff", r.moe_z_loss_coeff)
      .set("moe_expert_capacity_factor", r.moe_expert_capacity_factor)
      .set("moe_token_drop_policy",
           r.moe_token_drop_policy == TokenDropPolicy::probs ? "probs" : "position")
      .set("moe_pad_expert_input_to_capacity", r.moe_pad_expert_input_to_capacity)
      .set("moe_router_bias_update_rate", r.moe_router_bias_update_rate)
      .set("moe_input_jitter_eps", r.moe_input_jitter_eps)
      .set("moe_token_dispatcher_dedup", c.moe_token_dispatcher_dedup)
      .set("seed", c.seed);
}

}  // namespace v0
}  // namespace moefold
