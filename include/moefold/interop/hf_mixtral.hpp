#pragma once
/// \file
/// Hugging Face Mixtral (`MixtralForCausalLM`: `config.json` + `model.safetensors`) to and from
/// moefold checkpoints (format v2, any folding). docs/interop.md has the naming map.
///
///   export_hf_mixtral(reader, out_dir)   a checkpoint iteration → config.json, model.safetensors
///                                        in the classic per-expert naming of hub checkpoints
///   import_hf_mixtral(hf_dir, ckpt_dir)  the reverse: classic naming or transformers 5's fused
///                                        experts; parameters only (no optimizer state), so it
///                                        loads with --finetune / --no-load-optim
///
/// Megatron's QKV weight is group-interleaved: for each of the G query groups, its N/G query
/// heads, then its key head, then its value head, d rows each. Mixtral's q_proj holds the N query
/// heads in order, k_proj and v_proj the G key and value heads. Experts: fc1 [2F, H] = w1 (gate,
/// rows [0, F)) over w3 (up, rows [F, 2F)); fc2 [H, F] = w2. Norm weights are [1, H] in moefold
/// and [H] in Mixtral. Values are copied, never computed: a round trip is bit-exact.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/core/error.hpp"
#include "moefold/interop/mixtral_config.hpp"
#include "moefold/interop/safetensors.hpp"
#include "moefold/train/checkpoint.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {

/// One Mixtral tensor and where it lives in a moefold checkpoint: the row ranges `row_ranges`
/// of the moefold tensor `source` (all columns), gathered in order (several for q, k, v).
struct HfPiece {
  std::string hf_name;
  std::string source;
  std::vector<std::pair<std::int64_t, std::int64_t>> row_ranges;  ///< [first, count) of source
  std::vector<std::int64_t> hf_shape;
};

/// The row ranges of Megatron's group-interleaved QKV that make q_proj, k_proj or v_proj
/// (`which` 0, 1, 2): per query group g of G, its q/g query heads, its key head, its value head.
inline std::vector<std::pair<std::int64_t, std::int64_t>> qkv_rows(std::int64_t heads,
                                                                   std::int64_t groups,
                                                                   std::int64_t d, int which) {
  std::int64_t const qpg = heads / groups, stride = (qpg + 2) * d;
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (std::int64_t g = 0; g < groups; ++g) {
    if (which == 0) out.emplace_back(g * stride, qpg * d);
    if (which == 1) out.emplace_back(g * stride + qpg * d, d);
    if (which == 2) out.emplace_back(g * stride + (qpg + 1) * d, d);
  }
  return out;
}

/// Every Mixtral tensor (classic naming) of `c` with its moefold source.
inline std::vector<HfPiece> mixtral_pieces(MixtralConfig const& c) {
  std::int64_t const h = c.hidden_size, f = c.intermediate_size, d = c.head_dim;
  std::int64_t const n = c.num_attention_heads, g = c.num_key_value_heads;
  std::vector<HfPiece> out;
  auto whole = [&](std::string hf, std::string src, std::int64_t rows,
                   std::vector<std::int64_t> shape) {
    out.push_back({std::move(hf), std::move(src), {{0, rows}}, std::move(shape)});
  };
  whole("model.embed_tokens.weight", "embedding.word_embeddings.weight", c.vocab_size,
        {c.vocab_size, h});
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::string const hf = fmt::format("model.layers.{}.", l);
    std::string const mf = fmt::format("decoder.layers.{}.", l);
    whole(hf + "input_layernorm.weight", mf + "input_layernorm.weight", 1, {h});
    char const* qkv[] = {"q_proj", "k_proj", "v_proj"};
    for (int w = 0; w < 3; ++w)
      out.push_back({hf + "self_attn." + qkv[w] + ".weight",
                     mf + "self_attention.linear_qkv.weight",
                     qkv_rows(n, g, d, w),
                     {(w == 0 ? n : g) * d, h}});
    whole(hf + "self_attn.o_proj.weight", mf + "self_attention.linear_proj.weight", h, {h, n * d});
    whole(hf + "post_attention_layernorm.weight", mf + "pre_mlp_layernorm.weight", 1, {h});
    whole(hf + "block_sparse_moe.gate.weight", mf + "mlp.router.weight", c.num_local_experts,
          {c.num_local_experts, h});
    for (std::int64_t e = 0; e < c.num_local_experts; ++e) {
      std::string const he = fmt::format("{}block_sparse_moe.experts.{}.", hf, e);
      std::string const fc1 = fmt::format("{}mlp.experts.linear_fc1.weight{}", mf, e);
      out.push_back({he + "w1.weight", fc1, {{0, f}}, {f, h}});
      out.push_back({he + "w3.weight", fc1, {{f, f}}, {f, h}});
      whole(he + "w2.weight", fmt::format("{}mlp.experts.linear_fc2.weight{}", mf, e), h, {h, f});
    }
  }
  whole("model.norm.weight", "decoder.final_layernorm.weight", 1, {h});
  whole("lm_head.weight", "output_layer.weight", c.vocab_size, {c.vocab_size, h});
  return out;
}

/// The moefold tensors of `c` and their global shapes [rows, cols].
inline std::map<std::string, std::pair<std::int64_t, std::int64_t>> moefold_shapes(
    MixtralConfig const& c) {
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> out;
  std::int64_t const h = c.hidden_size, f = c.intermediate_size, d = c.head_dim;
  std::int64_t const n = c.num_attention_heads, g = c.num_key_value_heads;
  out["embedding.word_embeddings.weight"] = {c.vocab_size, h};
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::string const mf = fmt::format("decoder.layers.{}.", l);
    out[mf + "input_layernorm.weight"] = {1, h};
    out[mf + "self_attention.linear_qkv.weight"] = {g * (n / g + 2) * d, h};
    out[mf + "self_attention.linear_proj.weight"] = {h, n * d};
    out[mf + "pre_mlp_layernorm.weight"] = {1, h};
    out[mf + "mlp.router.weight"] = {c.num_local_experts, h};
    for (std::int64_t e = 0; e < c.num_local_experts; ++e) {
      out[fmt::format("{}mlp.experts.linear_fc1.weight{}", mf, e)] = {2 * f, h};
      out[fmt::format("{}mlp.experts.linear_fc2.weight{}", mf, e)] = {h, f};
    }
  }
  out["decoder.final_layernorm.weight"] = {1, h};
  out["output_layer.weight"] = {c.vocab_size, h};
  return out;
}

/// The optimizer's tensors in a checkpoint (moments, step count): not model weights.
inline bool is_optimizer_state(std::string const& name) {
  auto ends = [&](std::string_view s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  return name == "optimizer.steps" || ends(".exp_avg") || ends(".exp_avg_sq");
}

}  // namespace detail

/// Writes iteration `ckpt` as a Hugging Face Mixtral directory: `out_dir/config.json` and
/// `out_dir/model.safetensors` (classic per-expert naming, each tensor in its checkpoint dtype).
/// Throws when Mixtral cannot express the model (`mixtral_config_of`) or the checkpoint holds a
/// weight that has no Mixtral name. Reads every tensor whole: memory of one tensor at a time
/// plus the output.
inline void export_hf_mixtral(CheckpointReader const& ckpt, std::filesystem::path const& out_dir) {
  MixtralConfig const c = mixtral_config_of(ckpt.metadata().info);
  auto const shapes = detail::moefold_shapes(c);
  for (auto const& [name, t] : ckpt.metadata().tensors)
    if (!detail::is_optimizer_state(name) && !shapes.count(name))
      throw error(errc::invalid_argument,
                  fmt::format("checkpoint tensor '{}' has no Mixtral equivalent", name));
  SafetensorsWriter out;
  std::string loaded;
  std::vector<char> bytes;  // the source tensor, whole, in its stored dtype
  DType dtype = DType::f32;
  for (auto const& p : detail::mixtral_pieces(c)) {
    // Plain variables, not a structured binding: the lambda below captures them (clang 14, the
    // fuzz phase's compiler, cannot capture bindings).
    std::int64_t const rows = shapes.at(p.source).first, cols = shapes.at(p.source).second;
    if (loaded != p.source) {
      if (!ckpt.contains(p.source))
        throw error(errc::invalid_argument,
                    fmt::format("checkpoint iteration {} has no tensor '{}' (for {})", ckpt.step(),
                                p.source, p.hf_name));
      dtype = ckpt.metadata().tensors.at(p.source).dtype;
      bytes.resize(static_cast<std::size_t>(rows * cols) * size_of(dtype));
      std::vector<ParamBlock> const all{{.row0 = 0, .rows = rows, .col0 = 0, .cols = cols}};
      auto read = [&]<class T>(T) {
        ckpt.fill(p.source, rows, cols, all,
                  std::span<T>(reinterpret_cast<T*>(bytes.data()),
                               static_cast<std::size_t>(rows * cols)));
      };
      switch (dtype) {
        case DType::f32:
          read(float{});
          break;
        case DType::f64:
          read(double{});
          break;
        case DType::bf16:
          read(bf16{});
          break;
        default:
          throw error(errc::invalid_argument,
                      fmt::format("checkpoint tensor '{}' is {}, not a floating-point weight",
                                  p.source, name(dtype)));
      }
      loaded = p.source;
    }
    std::size_t const row_bytes = static_cast<std::size_t>(cols) * size_of(dtype);
    std::vector<char> piece;
    for (auto const& [first, count] : p.row_ranges)
      piece.insert(piece.end(), bytes.begin() + static_cast<std::ptrdiff_t>(first * row_bytes),
                   bytes.begin() + static_cast<std::ptrdiff_t>((first + count) * row_bytes));
    out.add_bytes(p.hf_name, dtype, p.hf_shape, std::move(piece));
  }
  std::filesystem::create_directories(out_dir);
  out.write(out_dir / "model.safetensors");
  std::ofstream(out_dir / "config.json") << c.to_json().dump(2) << "\n";
}

namespace detail {

/// The JSON of file `path`; throws naming the file when it is missing or not JSON.
inline nlohmann::json read_json(std::filesystem::path const& path) {
  if (!std::filesystem::exists(path))
    throw error(errc::invalid_argument, fmt::format("{} is missing", path.string()));
  try {
    return nlohmann::json::parse(std::ifstream(path));
  } catch (nlohmann::json::exception const& e) {
    throw error(errc::invalid_argument,
                fmt::format("{} is not JSON ({})", path.string(), e.what()));
  }
}

/// The tensors of a Hugging Face directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names.
class HfTensors {
 public:
  explicit HfTensors(std::filesystem::path const& dir) {
    auto const index = dir / "model.safetensors.index.json";
    if (std::filesystem::exists(index)) {
      nlohmann::json const j = read_json(index);
      std::map<std::string, std::size_t> opened;
      if (!j.contains("weight_map") || !j["weight_map"].is_object())
        throw error(errc::invalid_argument,
                    fmt::format("{} has no weight_map object", index.string()));
      for (auto const& [tensor, file] : j["weight_map"].items()) {
        if (!file.is_string())
          throw error(errc::invalid_argument, fmt::format("{}: weight_map['{}'] is not a file name",
                                                          index.string(), tensor));
        auto const f = file.get<std::string>();
        if (!opened.count(f)) {
          opened[f] = files_.size();
          files_.push_back(SafetensorsFile::open(dir / f));
        }
        where_[tensor] = opened[f];
      }
    } else {
      files_.push_back(SafetensorsFile::open(dir / "model.safetensors"));
      for (auto const& n : files_[0].names()) where_[n] = 0;
    }
  }
  bool contains(std::string const& n) const { return where_.count(n) != 0; }
  /// Tensor `n` as float, after checking that its shape is `shape`.
  template <class T>
  std::vector<T> read(std::string const& n, std::vector<std::int64_t> const& shape) const {
    auto it = where_.find(n);
    if (it == where_.end())
      throw error(errc::invalid_argument,
                  fmt::format("the Hugging Face checkpoint has no tensor '{}'", n));
    auto const& f = files_[it->second];
    if (f.entry(n).shape != shape)
      throw error(errc::invalid_argument,
                  fmt::format("tensor '{}' of {} has shape [{}], the config says [{}]", n,
                              f.path().string(), fmt::join(f.entry(n).shape, ", "),
                              fmt::join(shape, ", ")));
    return f.read<T>(n);
  }
  DType dtype(std::string const& n) const { return files_[where_.at(n)].entry(n).dtype; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (auto const& [k, v] : where_) out.push_back(k);
    return out;
  }

 private:
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> where_;
};

}  // namespace detail

/// Converts the Hugging Face Mixtral directory `hf_dir` (`config.json`, `model.safetensors` or
/// an index of shards; classic `block_sparse_moe` naming or transformers 5's fused
/// `mlp.experts.gate_up_proj [E, 2F, H]` / `mlp.experts.down_proj [E, H, F]` / `mlp.gate`) into
/// checkpoint iteration 0 of `ckpt_dir`, saved from one rank. Weights are stored as float: the
/// checkpoint holds parameters only (no moments, no step count), so moefold-train loads it with
/// `--finetune` or `--no-load-optim`, under any folding. Throws naming what moefold cannot
/// express or a tensor that is missing, of another shape, or left over.
inline void import_hf_mixtral(std::filesystem::path const& hf_dir,
                              std::filesystem::path const& ckpt_dir) {
  auto const config_path = hf_dir / "config.json";
  MixtralConfig c = MixtralConfig::from_json(detail::read_json(config_path), config_path.string());
  if (c.max_position_embeddings < 1) c.max_position_embeddings = 4096;
  detail::HfTensors const hf(hf_dir);
  auto const shapes = detail::moefold_shapes(c);
  std::map<std::string, std::vector<float>> tensors;  // moefold name → global values
  for (auto const& [name, shape] : shapes)
    tensors[name].resize(static_cast<std::size_t>(shape.first * shape.second));
  std::set<std::string> used;
  auto place = [&](detail::HfPiece const& p, std::vector<float> const& values) {
    auto& dst = tensors.at(p.source);
    std::size_t const cols = static_cast<std::size_t>(shapes.at(p.source).second);
    std::size_t at = 0;
    for (auto const& [first, count] : p.row_ranges)
      for (std::int64_t r = first; r < first + count; ++r, at += cols)
        std::copy_n(values.begin() + static_cast<std::ptrdiff_t>(at), cols,
                    dst.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * cols));
  };
  bool const fused = hf.contains("model.layers.0.mlp.experts.gate_up_proj");
  std::int64_t const e_count = c.num_local_experts, f = c.intermediate_size, h = c.hidden_size;
  std::string cached_name;
  std::vector<float> cached;
  for (auto const& p : detail::mixtral_pieces(c)) {
    std::string name = p.hf_name;
    if (name == "lm_head.weight" && c.tie_word_embeddings && !hf.contains(name))
      name = "model.embed_tokens.weight";  // tied: the output layer is the embedding
    if (fused && name.find(".block_sparse_moe.") != std::string::npos) {
      // transformers 5: one tensor per layer for all experts; the gate under mlp.gate.
      auto const layer = name.substr(0, name.find(".block_sparse_moe."));
      if (name.ends_with(".gate.weight")) {
        place(p, hf.read<float>(layer + ".mlp.gate.weight", p.hf_shape));
        used.insert(layer + ".mlp.gate.weight");
        continue;
      }
      auto const e = std::stoll(name.substr(name.find(".experts.") + 9));
      bool const down = name.ends_with(".w2.weight");
      std::string const fused_name =
          layer + (down ? ".mlp.experts.down_proj" : ".mlp.experts.gate_up_proj");
      if (fused_name != cached_name) {  // read once per layer, used by every expert
        cached = hf.read<float>(fused_name, down ? std::vector<std::int64_t>{e_count, h, f}
                                                 : std::vector<std::int64_t>{e_count, 2 * f, h});
        cached_name = fused_name;
        used.insert(fused_name);
      }
      auto const& all = cached;
      std::size_t const per = all.size() / static_cast<std::size_t>(e_count);
      std::size_t begin = static_cast<std::size_t>(e) * per;
      if (name.ends_with(".w3.weight"))
        begin += static_cast<std::size_t>(f * h);  // up: rows [F, 2F)
      std::size_t const n = static_cast<std::size_t>(p.hf_shape[0] * p.hf_shape[1]);
      place(p, std::vector<float>(all.begin() + static_cast<std::ptrdiff_t>(begin),
                                  all.begin() + static_cast<std::ptrdiff_t>(begin + n)));
      continue;
    }
    place(p, hf.read<float>(name, p.hf_shape));
    used.insert(name);
  }
  for (auto const& n : hf.names())
    if (!used.count(n) && !n.ends_with("rotary_emb.inv_freq"))
      throw error(errc::invalid_argument,
                  fmt::format("the Hugging Face checkpoint's tensor '{}' has no moefold "
                              "equivalent (attention biases? another architecture?)",
                              n));
  std::vector<ShardEntry> entries;
  for (auto& [name, values] : tensors) {
    auto const [rows, cols] = shapes.at(name);
    entries.push_back(ShardEntry::view(name, rows, cols,
                                       {{.row0 = 0, .rows = rows, .col0 = 0, .cols = cols}},
                                       std::span<float const>(values)));
  }
  CheckpointInfo const info = checkpoint_info_of(c);
  inproc::run(
      1, [&](inproc::Communicator& world) { save_checkpoint(world, ckpt_dir, 0, entries, info); });
}

}  // namespace v0
}  // namespace moefold
