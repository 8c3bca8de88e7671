#include "plan_json.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string_view>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "moefold/core/error.hpp"

namespace moefold::cli {

namespace {

bool looks_like_file(std::string const& s) {
  return s.ends_with(".json") || s.find('/') != std::string::npos || std::filesystem::exists(s);
}

nlohmann::json read_object(std::string const& path, std::string_view what) {
  std::ifstream in(path);
  if (!in) throw invalid_config(fmt::format("cannot read {} file '{}'", what, path));
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(in);
  } catch (nlohmann::json::exception const& e) {
    throw invalid_config(fmt::format("{} file '{}' is not valid JSON: {}", what, path, e.what()));
  }
  if (!doc.is_object())
    throw invalid_config(fmt::format("{} file '{}' must hold a JSON object", what, path));
  return doc;
}

/// Reads the keys of `doc` into fields; unknown keys and missing required keys are errors
/// naming the key.
class Reader {
 public:
  /// Rejects any key of `doc` not in `allowed` (a typo should not pass as a missing key).
  Reader(nlohmann::json const& doc, std::string path, std::string_view what,
         std::initializer_list<std::string_view> allowed)
      : doc_(doc), path_(std::move(path)), what_(what) {
    for (auto const& [key, value] : doc_.items())
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
        throw invalid_config(
            fmt::format("{} file '{}' has an unknown key \"{}\"", what_, path_, key));
  }

  template <class T>
  void get(char const* key, T& field, bool required) {
    auto it = doc_.find(key);
    if (it == doc_.end()) {
      if (required)
        throw invalid_config(
            fmt::format("{} file '{}' lacks the required key \"{}\"", what_, path_, key));
      return;
    }
    try {
      field = it->template get<T>();
    } catch (nlohmann::json::exception const&) {
      throw invalid_config(fmt::format("{} file '{}': \"{}\" has the wrong type ({})", what_, path_,
                                       key, it->dump()));
    }
  }

 private:
  nlohmann::json const& doc_;
  std::string path_;
  std::string_view what_;
};

}  // namespace

ModelSpec load_model(std::string const& name_or_file) {
  if (!looks_like_file(name_or_file)) return model_preset(name_or_file);
  auto const doc = read_object(name_or_file, "model");
  ModelSpec m;
  m.name = std::filesystem::path(name_or_file).stem().string();
  Reader r(doc, name_or_file, "model",
           {"name", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "kv_channels", "moe_ffn_hidden_size", "num_experts", "moe_router_topk",
            "moe_shared_expert_intermediate_size", "vocab_size", "seq_length", "swiglu",
            "untie_embeddings_and_output_weights"});
  r.get("name", m.name, false);
  r.get("num_layers", m.num_layers, true);
  r.get("hidden_size", m.hidden_size, true);
  r.get("num_attention_heads", m.num_attention_heads, true);
  m.num_query_groups = m.num_attention_heads;
  r.get("num_query_groups", m.num_query_groups, false);
  r.get("kv_channels", m.kv_channels, false);
  r.get("moe_ffn_hidden_size", m.moe_ffn_hidden_size, true);
  r.get("num_experts", m.num_experts, true);
  r.get("moe_router_topk", m.moe_router_topk, true);
  r.get("moe_shared_expert_intermediate_size", m.shared_expert_ffn_hidden_size, false);
  r.get("vocab_size", m.vocab_size, true);
  r.get("seq_length", m.seq_length, false);
  r.get("swiglu", m.swiglu, false);
  r.get("untie_embeddings_and_output_weights", m.untie_embeddings, false);
  m.validate();
  return m;
}

ClusterSpec load_cluster(std::string const& name_or_file) {
  if (!looks_like_file(name_or_file)) return cluster_preset(name_or_file);
  auto const doc = read_object(name_or_file, "cluster");
  ClusterSpec c = h100_cluster();
  c.name = std::filesystem::path(name_or_file).stem().string();
  Reader r(doc, name_or_file, "cluster",
           {"name", "gpus_per_node", "peak_tflops", "hbm_gb", "hbm_tb_per_s", "nvlink_gb_per_s",
            "nvlink_latency_us", "network_gb_per_s", "network_latency_us"});
  r.get("name", c.name, false);
  r.get("gpus_per_node", c.gpus_per_node, true);
  r.get("peak_tflops", c.peak_tflops, true);
  r.get("hbm_gb", c.hbm_gb, true);
  r.get("hbm_tb_per_s", c.hbm_tb_per_s, true);
  r.get("nvlink_gb_per_s", c.nvlink_gb_per_s, true);
  r.get("nvlink_latency_us", c.nvlink_latency_us, false);
  r.get("network_gb_per_s", c.network_gb_per_s, true);
  r.get("network_latency_us", c.network_latency_us, false);
  c.validate();
  return c;
}

}  // namespace moefold::cli
