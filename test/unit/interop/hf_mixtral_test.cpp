// Hugging Face Mixtral conversion (interop/hf_mixtral.hpp): the naming map and the QKV split
// against hand-written row lists, a bit-exact round trip of a checkpoint saved by two ranks, the
// refusal of every model Mixtral cannot express, and the fixtures transformers wrote
// (test/data/hf_mixtral, scripts/hf_fixture.py) read element by element against their formula.

#include <bit>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/interop/hf_mixtral.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"

using namespace moefold;
using moefold::test::error_of;
namespace fs = std::filesystem;

namespace {

fs::path scratch(std::string const& name) {
  auto const p =
      fs::temp_directory_path() / ("moefold_hf_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p;
}

// The tiny model: vocab 16, hidden 8, 4 heads in 2 query groups of head dim 2, 3 experts of
// FFN 6, top-2, one layer.
constexpr std::int64_t V = 16, H = 8, N = 4, G = 2, D = 2, E = 3, F = 6;

DecoderModelConfig decoder() {
  return {.vocab = V,
          .hidden = H,
          .num_layers = 1,
          .heads = N,
          .kv_groups = G,
          .seq = 32,
          .norm_eps = 1e-6,
          .rope_base = 1e6,
          .seed = 3};
}
MoELayerConfig moe() {
  MoELayerConfig m;
  m.hidden_size = H;
  m.moe_ffn_hidden_size = F;
  m.router.num_experts = E;
  m.router.moe_router_topk = 2;
  m.seed = 3;
  return m;
}
CheckpointInfo info_of(DecoderModelConfig const& d, MoELayerConfig const& m) {
  CheckpointInfo info;
  add_config(info, d);
  add_config(info, m);
  return info;
}

/// Every moefold tensor of the tiny model and its global shape (written out, not derived).
std::map<std::string, std::pair<std::int64_t, std::int64_t>> tiny_shapes() {
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> s{
      {"embedding.word_embeddings.weight", {V, H}},
      {"decoder.layers.0.input_layernorm.weight", {1, H}},
      {"decoder.layers.0.self_attention.linear_qkv.weight", {16, H}},  // G·(N/G + 2)·D
      {"decoder.layers.0.self_attention.linear_proj.weight", {H, N * D}},
      {"decoder.layers.0.pre_mlp_layernorm.weight", {1, H}},
      {"decoder.layers.0.mlp.router.weight", {E, H}},
      {"decoder.final_layernorm.weight", {1, H}},
      {"output_layer.weight", {V, H}}};
  for (int e = 0; e < E; ++e) {
    s["decoder.layers.0.mlp.experts.linear_fc1.weight" + std::to_string(e)] = {2 * F, H};
    s["decoder.layers.0.mlp.experts.linear_fc2.weight" + std::to_string(e)] = {H, F};
  }
  return s;
}

/// Saves `values` (global tensors) as a checkpoint of `ranks` ranks, each writing its share of
/// every tensor's rows (as a folding would), with the moments and step count of a real run.
void save_tiny(fs::path const& dir, std::map<std::string, std::vector<float>> const& values,
               CheckpointInfo const& info, int ranks) {
  auto const shapes = tiny_shapes();
  inproc::run(ranks, [&](inproc::Communicator& world) {
    std::vector<ShardEntry> entries;
    for (auto const& [name, v] : values) {
      auto const [rows, cols] = shapes.at(name);
      std::int64_t const r0 = rows * world.rank() / ranks, r1 = rows * (world.rank() + 1) / ranks;
      if (r1 == r0) continue;
      std::vector<ParamBlock> const block{{.row0 = r0, .rows = r1 - r0, .col0 = 0, .cols = cols}};
      std::span<float const> const mine(v.data() + r0 * cols,
                                        static_cast<std::size_t>((r1 - r0) * cols));
      entries.push_back(ShardEntry::copy(name, rows, cols, block, mine));
      std::vector<double> const moment(mine.size(), 0.5);
      entries.push_back(
          ShardEntry::copy(name + ".exp_avg", rows, cols, block, std::span<double const>(moment)));
    }
    std::vector<std::int64_t> const steps{7};
    if (world.rank() == 0)
      entries.push_back(ShardEntry::copy("optimizer.steps", 1, 1, {{0, 1, 0, 1}},
                                         std::span<std::int64_t const>(steps)));
    save_checkpoint(world, dir, 7, entries, info);
  });
}

/// Global tensor `name` of iteration `step` of `dir`.
std::vector<float> read_tensor(fs::path const& dir, std::string const& name,
                               std::int64_t step = 0) {
  auto const ckpt = CheckpointReader::open(dir, step);
  auto const& t = ckpt.metadata().tensors.at(name);
  std::vector<float> out(static_cast<std::size_t>(t.rows * t.cols));
  ckpt.fill(name, t.rows, t.cols, {{0, t.rows, 0, t.cols}}, std::span<float>(out));
  return out;
}

/// Row r of a row-major matrix with `cols` columns.
std::vector<float> row(std::vector<float> const& m, std::int64_t r, std::int64_t cols) {
  return {m.begin() + r * cols, m.begin() + (r + 1) * cols};
}

}  // namespace

TEST_CASE(
    "export splits Megatron's group-interleaved QKV and stacked fc1 into Mixtral's "
    "tensors, row by row",
    "[interop][hf]") {
  // Every element of tensor t holds 1000·t + its row (+ col/100): rows identify themselves.
  std::map<std::string, std::vector<float>> values;
  int t = 0;
  for (auto const& [name, shape] : tiny_shapes()) {
    auto& v = values[name];
    for (std::int64_t r = 0; r < shape.first; ++r)
      for (std::int64_t c = 0; c < shape.second; ++c)
        v.push_back(static_cast<float>(1000 * t + r) + static_cast<float>(c) / 100);
    ++t;
  }
  auto const ckpt = scratch("layout_ckpt"), out = scratch("layout_hf");
  save_tiny(ckpt, values, info_of(decoder(), moe()), 2);
  export_hf_mixtral(CheckpointReader::open(ckpt), out);
  auto const f = SafetensorsFile::open(out / "model.safetensors");
  auto const qkv = values.at("decoder.layers.0.self_attention.linear_qkv.weight");
  auto const rows_of = [&](std::string const& hf, std::vector<std::int64_t> const& rows,
                           std::vector<float> const& src) {
    auto const got = f.read<float>(hf);
    REQUIRE(got.size() == rows.size() * H);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      INFO(hf << " row " << i << " = source row " << rows[i]);
      CHECK(row(got, static_cast<std::int64_t>(i), H) == row(src, rows[i], H));
    }
  };
  // Group 0: q heads 0, 1 (rows 0–3), k (4–5), v (6–7); group 1: q heads 2, 3 (8–11), k (12–13),
  // v (14–15).
  rows_of("model.layers.0.self_attn.q_proj.weight", {0, 1, 2, 3, 8, 9, 10, 11}, qkv);
  rows_of("model.layers.0.self_attn.k_proj.weight", {4, 5, 12, 13}, qkv);
  rows_of("model.layers.0.self_attn.v_proj.weight", {6, 7, 14, 15}, qkv);
  auto const fc1 = values.at("decoder.layers.0.mlp.experts.linear_fc1.weight2");
  rows_of("model.layers.0.block_sparse_moe.experts.2.w1.weight", {0, 1, 2, 3, 4, 5}, fc1);
  rows_of("model.layers.0.block_sparse_moe.experts.2.w3.weight", {6, 7, 8, 9, 10, 11}, fc1);
  CHECK(f.read<float>("model.layers.0.block_sparse_moe.experts.1.w2.weight") ==
        values.at("decoder.layers.0.mlp.experts.linear_fc2.weight1"));
  CHECK(f.read<float>("model.layers.0.block_sparse_moe.gate.weight") ==
        values.at("decoder.layers.0.mlp.router.weight"));
  CHECK(f.read<float>("model.layers.0.post_attention_layernorm.weight") ==
        values.at("decoder.layers.0.pre_mlp_layernorm.weight"));
  CHECK(f.read<float>("lm_head.weight") == values.at("output_layer.weight"));
  CHECK(f.entry("model.norm.weight").shape == std::vector<std::int64_t>{H});
  CHECK(f.entry("model.layers.0.self_attn.o_proj.weight").shape ==
        std::vector<std::int64_t>{H, N * D});
  CHECK(f.names().size() == 3 + 7 + 3 * E);
  CHECK(f.metadata().at("format") == "pt");
  // config.json, with the names and values transformers reads.
  auto const config = nlohmann::json::parse(std::ifstream(out / "config.json"));
  CHECK(config.at("architectures") == nlohmann::json{"MixtralForCausalLM"});
  CHECK(config.at("intermediate_size") == F);
  CHECK(config.at("head_dim") == D);
  CHECK(config.at("num_key_value_heads") == G);
  CHECK(config.at("num_local_experts") == E);
  CHECK(config.at("num_experts_per_tok") == 2);
  CHECK(config.at("rope_theta") == 1e6);
  CHECK(config.at("rms_norm_eps") == 1e-6);
  CHECK(config.at("max_position_embeddings") == 32);
  CHECK(config.at("tie_word_embeddings") == false);
  CHECK(config.at("sliding_window").is_null());
  fs::remove_all(ckpt);
  fs::remove_all(out);
}

TEST_CASE("moefold → Hugging Face → moefold is bit-exact, and loads with the model's settings",
          "[interop][hf]") {
  // Random bit patterns of finite floats (signs, subnormals, every exponent).
  std::map<std::string, std::vector<float>> values;
  std::uint32_t x = 12345;
  for (auto const& [name, shape] : tiny_shapes())
    for (std::int64_t i = 0; i < shape.first * shape.second; ++i) {
      x = x * 1664525u + 1013904223u;
      float v = std::bit_cast<float>(x);
      values[name].push_back(std::isfinite(v) ? v : 0.5f);
    }
  auto const a = scratch("rt_a"), hf = scratch("rt_hf"), b = scratch("rt_b"),
             hf2 = scratch("rt_hf2");
  auto const info = info_of(decoder(), moe());
  save_tiny(a, values, info, 3);
  export_hf_mixtral(CheckpointReader::open(a), hf);
  import_hf_mixtral(hf, b);
  auto const back = CheckpointReader::open(b);
  CHECK(back.step() == 0);
  CHECK_FALSE(back.contains("optimizer.steps"));  // weights only
  CHECK(error_of([&] { back.check_model(info.model); }) == "no error");
  for (auto const& [name, v] : values) {
    INFO(name);
    auto const got = read_tensor(b, name);
    REQUIRE(got.size() == v.size());
    CHECK(std::memcmp(got.data(), v.data(), v.size() * sizeof(float)) == 0);
  }
  export_hf_mixtral(back, hf2);  // and the same file again, byte for byte
  std::ifstream f1(hf / "model.safetensors", std::ios::binary),
      f2(hf2 / "model.safetensors", std::ios::binary);
  CHECK(std::string(std::istreambuf_iterator<char>(f1), {}) ==
        std::string(std::istreambuf_iterator<char>(f2), {}));
  for (auto const& p : {a, hf, b, hf2}) fs::remove_all(p);
}

TEST_CASE("models Mixtral cannot express are refused, naming the option", "[interop][hf][errors]") {
  struct Case {
    std::string option;
    std::function<void(DecoderModelConfig&, MoELayerConfig&)> change;
  };
  std::vector<Case> const cases{
      {"--moe-shared-expert-intermediate-size",
       [](auto&, auto& m) { m.moe_shared_expert_intermediate_size = 16; }},
      {"--moe-router-score-function",
       [](auto&, auto& m) { m.router.moe_router_score_function = ScoreFunction::sigmoid; }},
      {"--moe-router-num-groups",
       [](auto&, auto& m) {
         m.router.moe_router_num_groups = 3;
         m.router.moe_router_group_topk = 1;
       }},
      {"--moe-router-enable-expert-bias",
       [](auto&, auto& m) { m.router.moe_router_enable_expert_bias = true; }},
      {"--moe-router-pre-softmax", [](auto&, auto& m) { m.router.moe_router_pre_softmax = true; }},
      {"--moe-router-topk-scaling-factor",
       [](auto&, auto& m) { m.router.moe_router_topk_scaling_factor = 2.5; }},
      {"--moe-router-topk", [](auto&, auto& m) { m.router.moe_router_topk = 1; }},
      {"--add-qkv-bias", [](auto& d, auto&) { d.add_qkv_bias = true; }},
  };
  for (auto const& c : cases) {
    INFO(c.option);
    auto d = decoder();
    auto m = moe();
    c.change(d, m);
    auto const e = error_of([&] { mixtral_config_of(info_of(d, m)); });
    CHECK(e.find("(" + c.option + ")") != std::string::npos);
    CHECK(e.find("Mixtral cannot express it") != std::string::npos);
  }
  CHECK(error_of([] { mixtral_config_of(info_of(decoder(), moe())); }) == "no error");
}

TEST_CASE("Hugging Face configs moefold cannot express are refused, naming the key",
          "[interop][hf][errors]") {
  auto const base = MixtralConfig{.vocab_size = V,
                                  .hidden_size = H,
                                  .intermediate_size = F,
                                  .num_hidden_layers = 1,
                                  .num_attention_heads = N,
                                  .num_key_value_heads = G,
                                  .head_dim = D,
                                  .num_local_experts = E,
                                  .num_experts_per_tok = 2,
                                  .max_position_embeddings = 32}
                        .to_json();
  auto refused = [&](auto change) {
    auto j = base;
    change(j);
    return error_of([&] { MixtralConfig::from_json(j, "config.json"); });
  };
  CHECK(refused([](auto&) {}) == "no error");
  CHECK(refused([](auto& j) {
          j["model_type"] = "qwen2_moe";
        }).find("model_type is \"qwen2_moe\"") != std::string::npos);
  CHECK(refused([](auto& j) { j["sliding_window"] = 4096; }).find("sliding_window is 4096") !=
        std::string::npos);
  CHECK(refused([](auto& j) { j["hidden_act"] = "gelu"; }).find("hidden_act is 'gelu'") !=
        std::string::npos);
  CHECK(refused([](auto& j) { j["num_experts_per_tok"] = 1; }).find("num_experts_per_tok is 1") !=
        std::string::npos);
  CHECK(refused([](auto& j) { j["head_dim"] = 4; }).find("head_dim 4 differs") !=
        std::string::npos);
  CHECK(refused([](auto& j) { j.erase("vocab_size"); }).find("has no 'vocab_size'") !=
        std::string::npos);
  CHECK(refused([](auto& j) {
          j["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1e6}};
        }).find("rope_type is 'yarn'") != std::string::npos);
}

namespace {

/// The value scripts/hf_fixture.py gave element `flat` of transformers' in-memory tensor with
/// base `base` in layer `layer`.
float fixture_value(int base, int layer, std::int64_t flat) {
  return static_cast<float>(base + 100 * layer) + static_cast<float>(flat) / 1024.0f;
}

}  // namespace

TEST_CASE(
    "the fixtures transformers wrote (classic and fused experts) import with every "
    "element in its place",
    "[interop][hf][fixture]") {
  // test/data/hf_mixtral: vocab 16, hidden 8, FFN 6, 2 layers, 4 heads, 2 KV heads, head dim 2,
  // 3 experts, top-2 (scripts/hf_fixture.py).
  constexpr std::int64_t h = 8, f = 6, d = 2, qpg = 2, experts = 3;
  fs::path const data = MOEFOLD_HF_FIXTURES;
  auto const classic = SafetensorsFile::open(data / "classic" / "model.safetensors");
  CHECK(classic.names().size() == 3 + 2 * (7 + 3 * experts));
  CHECK(classic.entry("model.layers.1.block_sparse_moe.experts.2.w2.weight").shape ==
        std::vector<std::int64_t>{h, f});
  CHECK(classic.entry("model.layers.0.self_attn.k_proj.weight").dtype == DType::f32);
  auto const fused = SafetensorsFile::open(data / "fused" / "model.safetensors");
  CHECK(fused.entry("model.layers.0.mlp.experts.gate_up_proj").shape ==
        std::vector<std::int64_t>{experts, 2 * f, h});
  CHECK(fused.entry("model.layers.0.mlp.experts.down_proj").shape ==
        std::vector<std::int64_t>{experts, h, f});

  for (char const* layout : {"classic", "fused"}) {
    INFO(layout);
    auto const ckpt = scratch(std::string("fixture_") + layout);
    import_hf_mixtral(data / layout, ckpt);
    auto const reader = CheckpointReader::open(ckpt);
    CHECK(reader.metadata().info.model.get("rotary_base") == "1000000");
    CHECK(reader.metadata().info.model.get("num_query_groups") == "2");
    for (int layer = 0; layer < 2; ++layer) {
      std::string const p = "decoder.layers." + std::to_string(layer) + ".";
      auto const qkv = read_tensor(ckpt, p + "self_attention.linear_qkv.weight");
      bool qkv_ok = true;
      for (std::int64_t g = 0; g < 2; ++g)
        for (std::int64_t j = 0; j < qpg + 2; ++j)  // q heads of group g, then k, then v
          for (std::int64_t t = 0; t < d; ++t)
            for (std::int64_t c = 0; c < h; ++c) {
              std::int64_t const mrow = (g * (qpg + 2) + j) * d + t;
              float const want =
                  j < qpg    ? fixture_value(6, layer, (((g * qpg + j) * d) + t) * h + c)  // q_proj
                  : j == qpg ? fixture_value(7, layer, (g * d + t) * h + c)                // k_proj
                             : fixture_value(8, layer, (g * d + t) * h + c);               // v_proj
              qkv_ok = qkv_ok && qkv[static_cast<std::size_t>(mrow * h + c)] == want;
            }
      CHECK(qkv_ok);
      bool experts_ok = true;
      for (std::int64_t e = 0; e < experts; ++e) {
        auto const fc1 = read_tensor(ckpt, p + "mlp.experts.linear_fc1.weight" + std::to_string(e));
        auto const fc2 = read_tensor(ckpt, p + "mlp.experts.linear_fc2.weight" + std::to_string(e));
        for (std::int64_t i = 0; i < 2 * f * h; ++i)  // gate_up_proj[e] is fc1: gate rows, up rows
          experts_ok = experts_ok && fc1[static_cast<std::size_t>(i)] ==
                                         fixture_value(11, layer, e * 2 * f * h + i);
        for (std::int64_t i = 0; i < h * f; ++i)
          experts_ok = experts_ok &&
                       fc2[static_cast<std::size_t>(i)] == fixture_value(12, layer, e * h * f + i);
      }
      CHECK(experts_ok);
      auto const router = read_tensor(ckpt, p + "mlp.router.weight");
      CHECK(router[5] == fixture_value(10, layer, 5));
      CHECK(read_tensor(ckpt, p + "pre_mlp_layernorm.weight")[3] == fixture_value(5, layer, 3));
      CHECK(read_tensor(ckpt, p + "self_attention.linear_proj.weight")[9] ==
            fixture_value(9, layer, 9));
    }
    CHECK(read_tensor(ckpt, "output_layer.weight")[17] == fixture_value(2, 0, 17));
    CHECK(read_tensor(ckpt, "embedding.word_embeddings.weight")[127] == fixture_value(1, 0, 127));
    CHECK(read_tensor(ckpt, "decoder.final_layernorm.weight")[7] == fixture_value(3, 0, 7));
    fs::remove_all(ckpt);
  }
}

TEST_CASE(
    "a Hugging Face checkpoint in shards (model.safetensors.index.json) imports as the "
    "single file does",
    "[interop][hf][fixture]") {
  fs::path const data = MOEFOLD_HF_FIXTURES;
  auto const whole = SafetensorsFile::open(data / "classic" / "model.safetensors");
  auto const dir = scratch("shards");
  fs::create_directories(dir);
  fs::copy_file(data / "classic" / "config.json", dir / "config.json");
  SafetensorsWriter first, second;
  nlohmann::json index = {{"metadata", {{"total_size", 0}}},
                          {"weight_map", nlohmann::json::object()}};
  for (auto const& name : whole.names()) {
    bool const one = name.find("layers.1.") == std::string::npos;  // layer 1 in the second shard
    auto const v = whole.read<float>(name);
    (one ? first : second).add(name, whole.entry(name).shape, std::span<float const>(v));
    index["weight_map"][name] =
        one ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  first.write(dir / "model-00001-of-00002.safetensors");
  second.write(dir / "model-00002-of-00002.safetensors");
  std::ofstream(dir / "model.safetensors.index.json") << index.dump();
  auto const from_shards = scratch("shards_ckpt"), from_file = scratch("file_ckpt");
  import_hf_mixtral(dir, from_shards);
  import_hf_mixtral(data / "classic", from_file);
  auto const a = CheckpointReader::open(from_shards);
  REQUIRE(a.metadata().tensors.size() ==
          CheckpointReader::open(from_file).metadata().tensors.size());
  for (auto const& [name, t] : a.metadata().tensors) {
    INFO(name);
    CHECK(read_tensor(from_shards, name) == read_tensor(from_file, name));
  }
  // An index without its map is refused by name.
  std::ofstream(dir / "model.safetensors.index.json") << R"({"metadata": {}})";
  CHECK(error_of([&] {
          import_hf_mixtral(dir, scratch("shards_bad"));
        }).find("model.safetensors.index.json has no weight_map object") != std::string::npos);
  for (auto const& p : {dir, from_shards, from_file}) fs::remove_all(p);
}
