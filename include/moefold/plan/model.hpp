#pragma once
/// \file
/// `ModelSpec`: the shape of an MoE transformer as the planner sees it (Megatron's
/// hyper-parameters), with presets for the paper's four models (spec/paper.md §4.2).

#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// Megatron's padded vocabulary: the next multiple of `divisible_by`·TP
/// (`make_vocab_size_divisible_by`, 128 by default, times the tensor-parallel size).
constexpr long padded_vocab_size(long vocab, int tp, int divisible_by = 128) noexcept {
  long const multiple = long{divisible_by} * tp;
  return (vocab + multiple - 1) / multiple * multiple;
}

/// An MoE decoder: every layer is attention + an MoE block (routed experts, optionally a shared
/// expert), RMSNorm, SwiGLU (or a plain two-GEMM MLP), untied input embedding and output layer.
struct ModelSpec {
  std::string name = "custom";
  int num_layers = 1;                     ///< L
  int hidden_size = 1;                    ///< h
  int num_attention_heads = 1;            ///< a
  int num_query_groups = 1;               ///< g (KV groups; = a without GQA)
  int kv_channels = 0;                    ///< d_head; 0 means h / a
  int moe_ffn_hidden_size = 1;            ///< F, width of one routed expert
  int num_experts = 1;                    ///< E
  int moe_router_topk = 1;                ///< k
  int shared_expert_ffn_hidden_size = 0;  ///< total shared-expert width (0: none)
  int vocab_size = 1;                     ///< V before Megatron's padding
  int seq_length = 4096;                  ///< default sequence length
  bool swiglu = true;                     ///< gated linear unit: fc1 is 2·F wide
  bool untie_embeddings = true;           ///< separate output-layer weights
  bool add_qkv_bias = false;              ///< a bias on the QKV projection (Megatron's flag)
  /// The vocabulary is padded to a multiple of this times TP (Megatron's
  /// `make_vocab_size_divisible_by`; 1 with TP dividing V: no padding, as moefold-train's bytes).
  int make_vocab_size_divisible_by = 128;

  /// Megatron's padded vocabulary under tensor parallelism `tp`.
  long padded_vocab(int tp) const noexcept {
    return padded_vocab_size(vocab_size, tp, make_vocab_size_divisible_by);
  }

  /// d_head.
  int head_dim() const noexcept {
    return kv_channels > 0 ? kv_channels : hidden_size / num_attention_heads;
  }
  /// fc1's output width per F: 2 with SwiGLU, 1 otherwise.
  int fc1_factor() const noexcept { return swiglu ? 2 : 1; }

  /// Attention weights of one layer (QKV, its bias with `add_qkv_bias`, output projection).
  double attention_params_per_layer() const noexcept {
    double const h = hidden_size, d = head_dim();
    double const qkv = (num_attention_heads + 2.0 * num_query_groups) * d;
    return (h + (add_qkv_bias ? 1 : 0)) * qkv + double(num_attention_heads) * d * h;
  }
  /// Weights of one routed expert (fc1 and fc2).
  double params_per_expert() const noexcept {
    return double(hidden_size) * moe_ffn_hidden_size * (fc1_factor() + 1);
  }
  /// Shared-expert weights of one layer.
  double shared_expert_params_per_layer() const noexcept {
    return double(hidden_size) * shared_expert_ffn_hidden_size * (fc1_factor() + 1);
  }
  /// Weights of one layer replicated across TP (two RMSNorms) and the router.
  double replicated_params_per_layer() const noexcept {
    return 2.0 * hidden_size + double(num_experts) * hidden_size;
  }
  /// Every weight of the model (with the unpadded vocabulary).
  double total_params() const noexcept {
    double const per_layer = attention_params_per_layer() + shared_expert_params_per_layer() +
                             replicated_params_per_layer() +
                             double(num_experts) * params_per_expert();
    return num_layers * per_layer + double(vocab_size) * hidden_size * (untie_embeddings ? 2 : 1);
  }
  /// Weights a token uses (top-k experts instead of all).
  double active_params() const noexcept {
    double const per_layer = attention_params_per_layer() + shared_expert_params_per_layer() +
                             replicated_params_per_layer() +
                             double(moe_router_topk) * params_per_expert();
    return num_layers * per_layer + double(vocab_size) * hidden_size * (untie_embeddings ? 2 : 1);
  }

  /// Throws `invalid_config` naming the first rule the shape breaks.
  void validate() const {
    auto positive = [&](long v, std::string_view what) {
      if (v < 1)
        throw invalid_config(
            fmt::format("model '{}': {} must be at least 1 (got {})", name, what, v));
    };
    positive(num_layers, "num_layers");
    positive(hidden_size, "hidden_size");
    positive(num_attention_heads, "num_attention_heads");
    positive(num_query_groups, "num_query_groups");
    positive(moe_ffn_hidden_size, "moe_ffn_hidden_size");
    positive(num_experts, "num_experts");
    positive(moe_router_topk, "moe_router_topk");
    positive(vocab_size, "vocab_size");
    positive(seq_length, "seq_length");
    positive(make_vocab_size_divisible_by, "make_vocab_size_divisible_by");
    if (kv_channels < 0)
      throw invalid_config(
          fmt::format("model '{}': kv_channels must not be negative (got {})", name, kv_channels));
    if (shared_expert_ffn_hidden_size < 0)
      throw invalid_config(
          fmt::format("model '{}': shared_expert_ffn_hidden_size must not be "
                      "negative (got {})",
                      name, shared_expert_ffn_hidden_size));
    if (kv_channels == 0 && hidden_size % num_attention_heads != 0)
      throw invalid_config(fmt::format(
          "model '{}': hidden_size ({}) is not divisible by num_attention_heads ({}); give "
          "kv_channels",
          name, hidden_size, num_attention_heads));
    if (num_attention_heads % num_query_groups != 0)
      throw invalid_config(fmt::format(
          "model '{}': num_attention_heads ({}) is not divisible by num_query_groups ({})", name,
          num_attention_heads, num_query_groups));
    if (moe_router_topk > num_experts)
      throw invalid_config(fmt::format("model '{}': moe_router_topk ({}) exceeds num_experts ({})",
                                       name, moe_router_topk, num_experts));
  }
};

/// Mixtral 8x22B: 56 layers, h 6144, 48 heads, 8 KV groups, 8 experts of width 16384, top-2,
/// vocabulary 32000.
inline ModelSpec mixtral_8x22b() {
  return {.name = "mixtral-8x22b",
          .num_layers = 56,
          .hidden_size = 6144,
          .num_attention_heads = 48,
          .num_query_groups = 8,
          .moe_ffn_hidden_size = 16384,
          .num_experts = 8,
          .moe_router_topk = 2,
          .vocab_size = 32000};
}

/// Llama3-8x70B: Llama3-70B upcycled to 8 experts (80 layers, h 8192, 64 heads, 8 KV groups,
/// width 28672, vocabulary 128256), top-2 (the paper does not state k).
inline ModelSpec llama3_8x70b() {
  return {.name = "llama3-8x70b",
          .num_layers = 80,
          .hidden_size = 8192,
          .num_attention_heads = 64,
          .num_query_groups = 8,
          .moe_ffn_hidden_size = 28672,
          .num_experts = 8,
          .moe_router_topk = 2,
          .vocab_size = 128256};
}

/// Qwen2-57B-A14B: 28 layers, h 3584, 28 heads, 4 KV groups, 64 experts of width 2560, top-8,
/// shared expert width 20480, vocabulary 151936.
inline ModelSpec qwen2_57b_a14b() {
  return {.name = "qwen2-57b-a14b",
          .num_layers = 28,
          .hidden_size = 3584,
          .num_attention_heads = 28,
          .num_query_groups = 4,
          .moe_ffn_hidden_size = 2560,
          .num_experts = 64,
          .moe_router_topk = 8,
          .shared_expert_ffn_hidden_size = 20480,
          .vocab_size = 151936};
}

/// Mixtral-8x22B-G8T8: Mixtral 8x22B with each expert split in 8 (64 experts of width 2048),
/// top-8.
inline ModelSpec mixtral_8x22b_g8t8() {
  ModelSpec m = mixtral_8x22b();
  m.name = "mixtral-8x22b-g8t8";
  m.moe_ffn_hidden_size = 2048;
  m.num_experts = 64;
  m.moe_router_topk = 8;
  return m;
}

/// Names of the model presets.
inline std::vector<std::string> model_preset_names() {
  return {"mixtral-8x22b", "llama3-8x70b", "qwen2-57b-a14b", "mixtral-8x22b-g8t8"};
}

/// The preset called `name`; throws `invalid_config` for any other name.
inline ModelSpec model_preset(std::string_view name) {
  if (name == "mixtral-8x22b") return mixtral_8x22b();
  if (name == "llama3-8x70b") return llama3_8x70b();
  if (name == "qwen2-57b-a14b") return qwen2_57b_a14b();
  if (name == "mixtral-8x22b-g8t8") return mixtral_8x22b_g8t8();
  throw invalid_config(fmt::format(
      "unknown model preset '{}' (presets: mixtral-8x22b, llama3-8x70b, qwen2-57b-a14b, "
      "mixtral-8x22b-g8t8; or give a JSON file)",
      name));
}

}  // namespace v0
}  // namespace moefold
