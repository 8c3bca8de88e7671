#include "plan_json.hpp"

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <string_view>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "input.hpp"
#include "moefold/core/error.hpp"

namespace moefold::cli {

namespace {

bool looks_like_file(std::string const& s) {
  return s.ends_with(".json") || s.find('/') != std::string::npos || std::filesystem::exists(s);
}

nlohmann::json parse_object(std::string_view text, std::string const& origin,
                            std::string_view what) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (nlohmann::json::exception const& e) {
    throw invalid_config(fmt::format("{} file '{}' is not valid JSON: {}", what, origin, e.what()));
  }
  if (!doc.is_object())
    throw invalid_config(fmt::format("{} file '{}' must hold a JSON object", what, origin));
  return doc;
}

/// Reads the keys of `doc` into fields, each checked for type and range; unknown keys and
/// missing required keys are errors naming the key.
class Reader {
 public:
  /// Rejects any key of `doc` not in `allowed` (a typo should not pass as a missing key).
  Reader(nlohmann::json const& doc, std::string origin, std::string_view what,
         std::initializer_list<std::string_view> allowed)
      : doc_(doc), origin_(std::move(origin)), what_(what) {
    for (auto const& [key, value] : doc_.items())
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
        throw invalid_config(
            fmt::format("{} file '{}' has an unknown key \"{}\"", what_, origin_, key));
  }

  /// An integer in [lo, hi]: 32.7, 1e30, "32" and 2^32+4096 are errors, not 32 or 4096.
  void get(char const* key, int& field, bool required, long lo, long hi) {
    auto const* v = find(key, required);
    if (v == nullptr) return;
    bool in_range = false;
    std::int64_t value = 0;
    if (v->is_number_unsigned()) {
      auto const u = v->get<std::uint64_t>();
      in_range = u <= static_cast<std::uint64_t>(hi) && static_cast<std::int64_t>(u) >= lo;
      value = static_cast<std::int64_t>(u);
    } else if (v->is_number_integer()) {
      value = v->get<std::int64_t>();
      in_range = value >= lo && value <= hi;
    }
    if (!in_range)
      throw invalid_config(
          fmt::format("{} file '{}': \"{}\" must be an integer between {} and {} "
                      "(got {})",
                      what_, origin_, key, lo, hi, v->dump()));
    field = static_cast<int>(value);
  }
  /// A finite number in [lo, hi].
  void get(char const* key, double& field, bool required, double lo, double hi) {
    auto const* v = find(key, required);
    if (v == nullptr) return;
    if (!v->is_number() || !(v->get<double>() >= lo && v->get<double>() <= hi))
      throw invalid_config(
          fmt::format("{} file '{}': \"{}\" must be a number between {} and {} "
                      "(got {})",
                      what_, origin_, key, lo, hi, v->dump()));
    field = v->get<double>();
  }
  void get(char const* key, bool& field, bool required) {
    auto const* v = find(key, required);
    if (v == nullptr) return;
    if (!v->is_boolean())
      throw invalid_config(fmt::format("{} file '{}': \"{}\" must be true or false (got {})", what_,
                                       origin_, key, v->dump()));
    field = v->get<bool>();
  }
  void get(char const* key, std::string& field, bool required) {
    auto const* v = find(key, required);
    if (v == nullptr) return;
    if (!v->is_string())
      throw invalid_config(fmt::format("{} file '{}': \"{}\" must be a string (got {})", what_,
                                       origin_, key, v->dump()));
    field = v->get<std::string>();
  }

 private:
  nlohmann::json const* find(char const* key, bool required) const {
    auto it = doc_.find(key);
    if (it != doc_.end()) return &*it;
    if (required)
      throw invalid_config(
          fmt::format("{} file '{}' lacks the required key \"{}\"", what_, origin_, key));
    return nullptr;
  }

  nlohmann::json const& doc_;
  std::string origin_;
  std::string_view what_;
};

constexpr long kMaxInt = std::numeric_limits<int>::max();

}  // namespace

ModelSpec parse_model(std::string_view text, std::string const& origin) {
  auto const doc = parse_object(text, origin, "model");
  ModelSpec m;
  m.name = std::filesystem::path(origin).stem().string();
  Reader r(doc, origin, "model",
           {"name", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "kv_channels", "moe_ffn_hidden_size", "num_experts", "moe_router_topk",
            "moe_shared_expert_intermediate_size", "vocab_size", "seq_length", "swiglu",
            "untie_embeddings_and_output_weights", "add_qkv_bias", "make_vocab_size_divisible_by"});
  r.get("name", m.name, false);
  r.get("num_layers", m.num_layers, true, 1, kMaxInt);
  r.get("hidden_size", m.hidden_size, true, 1, kMaxInt);
  r.get("num_attention_heads", m.num_attention_heads, true, 1, kMaxInt);
  m.num_query_groups = m.num_attention_heads;
  r.get("num_query_groups", m.num_query_groups, false, 1, kMaxInt);
  r.get("kv_channels", m.kv_channels, false, 0, kMaxInt);
  r.get("moe_ffn_hidden_size", m.moe_ffn_hidden_size, true, 1, kMaxInt);
  r.get("num_experts", m.num_experts, true, 1, kMaxInt);
  r.get("moe_router_topk", m.moe_router_topk, true, 1, kMaxInt);
  r.get("moe_shared_expert_intermediate_size", m.shared_expert_ffn_hidden_size, false, 0, kMaxInt);
  r.get("vocab_size", m.vocab_size, true, 1, kMaxInt);
  r.get("seq_length", m.seq_length, false, 1, kMaxInt);
  r.get("swiglu", m.swiglu, false);
  r.get("untie_embeddings_and_output_weights", m.untie_embeddings, false);
  r.get("add_qkv_bias", m.add_qkv_bias, false);
  r.get("make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, false, 1, kMaxInt);
  m.validate();
  return m;
}

ModelSpec load_model(std::string const& name_or_file) {
  if (!looks_like_file(name_or_file)) return model_preset(name_or_file);
  return parse_model(read_text_file(name_or_file, "model"), name_or_file);
}

ClusterSpec parse_cluster(std::string_view text, std::string const& origin) {
  auto const doc = parse_object(text, origin, "cluster");
  ClusterSpec c = h100_cluster();
  c.name = std::filesystem::path(origin).stem().string();
  Reader r(doc, origin, "cluster",
           {"name", "gpus_per_node", "peak_tflops", "hbm_gb", "hbm_tb_per_s", "nvlink_gb_per_s",
            "nvlink_latency_us", "network_gb_per_s", "network_latency_us"});
  constexpr double kMaxReal = 1e12;  // far beyond any device; keeps every product finite
  r.get("name", c.name, false);
  r.get("gpus_per_node", c.gpus_per_node, true, 1, ClusterSpec::kMaxGpusPerNode);
  r.get("peak_tflops", c.peak_tflops, true, 0, kMaxReal);
  r.get("hbm_gb", c.hbm_gb, true, 0, kMaxReal);
  r.get("hbm_tb_per_s", c.hbm_tb_per_s, true, 0, kMaxReal);
  r.get("nvlink_gb_per_s", c.nvlink_gb_per_s, true, 0, kMaxReal);
  r.get("nvlink_latency_us", c.nvlink_latency_us, false, 0, kMaxReal);
  r.get("network_gb_per_s", c.network_gb_per_s, true, 0, kMaxReal);
  r.get("network_latency_us", c.network_latency_us, false, 0, kMaxReal);
  c.validate();
  return c;
}

ClusterSpec load_cluster(std::string const& name_or_file) {
  if (!looks_like_file(name_or_file)) return cluster_preset(name_or_file);
  return parse_cluster(read_text_file(name_or_file, "cluster"), name_or_file);
}

}  // namespace moefold::cli
