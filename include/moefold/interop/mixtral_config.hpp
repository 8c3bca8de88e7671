#pragma once
/// \file
/// `MixtralConfig`: a Hugging Face Mixtral model's `config.json`, and its correspondence with the
/// model settings of a moefold checkpoint (`DecoderModelConfig` and `MoELayerConfig`, under
/// Megatron's names): `mixtral_config_of` refuses, by name, a moefold model Mixtral cannot
/// express; `MixtralConfig::from_json` a Mixtral moefold cannot express. docs/interop.md.

#include <cstdint>
#include <string>
#include <type_traits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "moefold/core/error.hpp"
#include "moefold/mesh/folded_mapping.hpp"
#include "moefold/train/checkpoint_config.hpp"
#include "moefold/train/checkpoint_metadata.hpp"

namespace moefold {
inline namespace v0 {

/// A Mixtral model's sizes, under the names of its `config.json`.
struct MixtralConfig {
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;  ///< one expert's FFN width F
  std::int64_t num_hidden_layers = 0;
  std::int64_t num_attention_heads = 0;
  std::int64_t num_key_value_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t num_local_experts = 0;
  std::int64_t num_experts_per_tok = 0;
  std::int64_t max_position_embeddings = 0;
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  bool tie_word_embeddings = false;

  /// `config.json` of a `MixtralForCausalLM` (float32, `sliding_window: null`).
  nlohmann::json to_json() const {
    return {{"architectures", {"MixtralForCausalLM"}},
            {"model_type", "mixtral"},
            {"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_key_value_heads", num_key_value_heads},
            {"head_dim", head_dim},
            {"num_local_experts", num_local_experts},
            {"num_experts_per_tok", num_experts_per_tok},
            {"max_position_embeddings", max_position_embeddings},
            {"rope_theta", rope_theta},
            {"rms_norm_eps", rms_norm_eps},
            {"tie_word_embeddings", tie_word_embeddings},
            {"sliding_window", nullptr},
            {"hidden_act", "silu"},
            {"attention_dropout", 0.0},
            {"router_aux_loss_coef", 0.0},
            {"output_router_logits", false},
            {"torch_dtype", "float32"},
            {"use_cache", false}};
  }

  /// Reads `config.json` (text of file `what`); throws naming the key when one is missing or
  /// when the model is one moefold cannot express (not Mixtral, another activation, a sliding
  /// window, top-1 routing, a head dimension other than hidden / heads).
  static MixtralConfig from_json(nlohmann::json const& j, std::string const& what) {
    auto fail = [&](std::string const& why) {
      return error(errc::invalid_argument, fmt::format("{}: {}", what, why));
    };
    auto get = [&]<class V>(char const* key, V& out) {
      if (!j.contains(key) || j[key].is_null()) throw fail(fmt::format("has no '{}'", key));
      try {
        out = j[key].get<V>();
      } catch (nlohmann::json::exception const&) {
        throw fail(fmt::format("'{}' is {}, not a {}", key, j[key].dump(),
                               std::is_same_v<V, double> ? "number" : "whole number"));
      }
    };
    if (j.value("model_type", std::string()) != "mixtral")
      throw fail(fmt::format("model_type is {}, not \"mixtral\" (moefold converts Mixtral only)",
                             j.contains("model_type") ? j["model_type"].dump() : "missing"));
    MixtralConfig c;
    get("vocab_size", c.vocab_size);
    get("hidden_size", c.hidden_size);
    get("intermediate_size", c.intermediate_size);
    get("num_hidden_layers", c.num_hidden_layers);
    get("num_attention_heads", c.num_attention_heads);
    c.num_key_value_heads = c.num_attention_heads;
    if (j.contains("num_key_value_heads")) get("num_key_value_heads", c.num_key_value_heads);
    get("num_local_experts", c.num_local_experts);
    get("num_experts_per_tok", c.num_experts_per_tok);
    c.max_position_embeddings = j.value("max_position_embeddings", std::int64_t{0});
    if (j.contains("rope_theta")) get("rope_theta", c.rope_theta);
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {  // transformers 5
      auto const& rope = j["rope_parameters"];
      if (auto const type = rope.value("rope_type", std::string("default")); type != "default")
        throw fail(
            fmt::format("rope_parameters.rope_type is '{}': moefold's RoPE is the default "
                        "one (no scaling)",
                        type));
      if (rope.contains("rope_theta")) c.rope_theta = rope["rope_theta"].get<double>();
    }
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
      throw fail(fmt::format("rope_scaling is {}: moefold's RoPE has no scaling",
                             j["rope_scaling"].dump()));
    if (j.contains("rms_norm_eps")) get("rms_norm_eps", c.rms_norm_eps);
    c.tie_word_embeddings = j.value("tie_word_embeddings", false);
    if (c.num_attention_heads < 1 || c.hidden_size % c.num_attention_heads != 0)
      throw fail(fmt::format("hidden_size {} is not a multiple of num_attention_heads {}",
                             c.hidden_size, c.num_attention_heads));
    c.head_dim = c.hidden_size / c.num_attention_heads;
    if (j.contains("head_dim") && !j["head_dim"].is_null()) {
      std::int64_t d = 0;
      get("head_dim", d);
      if (d != c.head_dim)
        throw fail(
            fmt::format("head_dim {} differs from hidden_size / num_attention_heads = {}: "
                        "moefold's attention derives it (kv_channels)",
                        d, c.head_dim));
    }
    if (auto const act = j.value("hidden_act", std::string("silu")); act != "silu")
      throw fail(fmt::format("hidden_act is '{}': moefold's experts are SwiGLU (silu)", act));
    if (j.contains("sliding_window") && !j["sliding_window"].is_null())
      throw fail(
          fmt::format("sliding_window is {}: moefold's attention is full causal "
                      "(sliding_window must be null)",
                      j["sliding_window"].dump()));
    if (c.num_experts_per_tok < 2)
      throw fail(
          fmt::format("num_experts_per_tok is {}: top-1 Mixtral routing (weight 1) has "
                      "no moefold equivalent (top-1 needs --moe-router-pre-softmax)",
                      c.num_experts_per_tok));
    if (c.num_key_value_heads < 1 || c.num_attention_heads % c.num_key_value_heads != 0)
      throw fail(fmt::format("num_attention_heads {} is not a multiple of num_key_value_heads {}",
                             c.num_attention_heads, c.num_key_value_heads));
    return c;
  }
};

namespace detail {

/// A checkpoint model setting as text; throws naming it when the checkpoint lacks it.
inline std::string setting(CheckpointInfo const& info, char const* key) {
  if (auto const v = info.model.get(key)) return *v;
  throw error(errc::invalid_argument,
              fmt::format("the checkpoint does not record the model's {}: not a moefold decoder "
                          "with an MoE MLP",
                          key));
}
inline std::int64_t setting_int(CheckpointInfo const& info, char const* key) {
  return std::stoll(setting(info, key));
}
}  // namespace detail

/// The Mixtral equivalent of a checkpoint's model settings (`info.model`, with `seq_length`
/// from `info.run` as max_position_embeddings). Throws naming the setting (and moefold-train's
/// flag) when Mixtral cannot express the model: a shared expert, sigmoid or group-limited
/// routing, an expert bias, pre-softmax, a top-k scaling factor, top-1 routing, attention biases.
inline MixtralConfig mixtral_config_of(CheckpointInfo const& info) {
  auto refuse = [](char const* key, std::string const& value, char const* flag, char const* why) {
    return error(errc::invalid_argument,
                 fmt::format("the checkpoint has {} = {} ({}): {}; Mixtral cannot express it", key,
                             value, flag, why));
  };
  auto const is = [&](char const* key, char const* want) {
    return detail::setting(info, key) == want;
  };
  if (!is("moe_shared_expert_intermediate_size", "0"))
    throw refuse("moe_shared_expert_intermediate_size",
                 detail::setting(info, "moe_shared_expert_intermediate_size"),
                 "--moe-shared-expert-intermediate-size", "a shared expert");
  if (!is("moe_router_score_function", "softmax"))
    throw refuse("moe_router_score_function", detail::setting(info, "moe_router_score_function"),
                 "--moe-router-score-function", "Mixtral's router is a softmax");
  if (!is("moe_router_num_groups", "0"))
    throw refuse("moe_router_num_groups", detail::setting(info, "moe_router_num_groups"),
                 "--moe-router-num-groups", "group-limited routing");
  if (!is("moe_router_enable_expert_bias", "false"))
    throw refuse("moe_router_enable_expert_bias", "true", "--moe-router-enable-expert-bias",
                 "an expert bias in the routing");
  if (!is("moe_router_pre_softmax", "false"))
    throw refuse("moe_router_pre_softmax", "true", "--moe-router-pre-softmax",
                 "Mixtral renormalizes the top-k probabilities");
  if (!is("moe_router_topk_scaling_factor", "none"))
    throw refuse("moe_router_topk_scaling_factor",
                 detail::setting(info, "moe_router_topk_scaling_factor"),
                 "--moe-router-topk-scaling-factor", "a scaled top-k");
  if (detail::setting_int(info, "moe_router_topk") < 2)
    throw refuse("moe_router_topk", "1", "--moe-router-topk",
                 "top-1 without pre-softmax is not a moefold model, and with it the weight is p, "
                 "not Mixtral's 1");
  if (auto const bias = info.model.get("add_qkv_bias"); bias && *bias != "false")
    throw refuse("add_qkv_bias", *bias, "--add-qkv-bias", "attention biases");
  MixtralConfig c;
  c.vocab_size = detail::setting_int(info, "padded_vocab_size");
  c.hidden_size = detail::setting_int(info, "hidden_size");
  c.intermediate_size = detail::setting_int(info, "moe_ffn_hidden_size");
  c.num_hidden_layers = detail::setting_int(info, "num_layers");
  c.num_attention_heads = detail::setting_int(info, "num_attention_heads");
  c.num_key_value_heads = detail::setting_int(info, "num_query_groups");
  c.head_dim = c.hidden_size / c.num_attention_heads;
  c.num_local_experts = detail::setting_int(info, "num_moe_experts");
  c.num_experts_per_tok = detail::setting_int(info, "moe_router_topk");
  c.rope_theta = std::stod(detail::setting(info, "rotary_base"));
  c.rms_norm_eps = std::stod(detail::setting(info, "norm_epsilon"));
  c.max_position_embeddings = std::stoll(info.run.get("seq_length").value_or("4096"));
  return c;
}

/// The moefold settings of a Mixtral model: `DecoderModelConfig` and `MoELayerConfig` as
/// moefold-train would build them for the same model, so `check_model` accepts the checkpoint.
inline CheckpointInfo checkpoint_info_of(MixtralConfig const& c) {
  CheckpointInfo info;
  info.folding = folding_entries(FoldedMapping::from({.world = 1}));
  add_config(info, DecoderModelConfig{.vocab = c.vocab_size,
                                      .hidden = c.hidden_size,
                                      .num_layers = c.num_hidden_layers,
                                      .heads = c.num_attention_heads,
                                      .kv_groups = c.num_key_value_heads,
                                      .seq = c.max_position_embeddings,
                                      .norm_eps = c.rms_norm_eps,
                                      .rope_base = c.rope_theta});
  MoELayerConfig m;
  m.hidden_size = c.hidden_size;
  m.moe_ffn_hidden_size = c.intermediate_size;
  m.router.num_experts = static_cast<int>(c.num_local_experts);
  m.router.moe_router_topk = static_cast<int>(c.num_experts_per_tok);
  m.seed = 0;  // the decoder's: weights come from the file, not from a seed
  add_config(info, m);
  info.run.set("converted_from", "hf_mixtral");
  return info;
}

}  // namespace v0
}  // namespace moefold
