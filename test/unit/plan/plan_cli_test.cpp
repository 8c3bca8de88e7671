// `moefold plan`: the JSON contract, the table, --explain, model/cluster files, and exit status 2
// with one line on stderr for invalid input.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "support/catch.hpp"
#include "support/cli_checks.hpp"
#include "support/run_command.hpp"

using moefold::test::run_command;

namespace {
std::string cli(std::string const& args) { return std::string(MOEFOLD_CLI) + " " + args; }
std::string examples(std::string const& file) {
  return std::string(MOEFOLD_PLAN_EXAMPLES) + "/" + file;
}
}  // namespace

TEST_CASE("plan --json lists the top K best first with the documented fields") {
  auto const r = run_command(
      cli("plan --model mixtral-8x22b --gpus 128 --global-batch-size 256 --seq-length 4096 "
          "--top 4 --json"));
  REQUIRE(r.status == 0);
  auto const doc = nlohmann::json::parse(r.out);
  auto const& configs = doc.at("configs");
  REQUIRE(configs.size() == 4);
  for (auto const* key : {"tp", "cp", "pp", "vpp", "ep", "etp", "dp", "edp", "micro_batch_size",
                          "mfu", "tokens_per_s_per_gpu", "memory_gb", "folded"}) {
    INFO(key);
    CHECK(configs[0].contains(key));
    CHECK(doc.at("best_unfolded").contains(key));
  }
  for (std::size_t i = 0; i < configs.size(); ++i) {
    auto const& c = configs[i];
    CHECK(c.at("mfu").get<double>() > 0.1);
    CHECK(c.at("mfu").get<double>() < 1.0);  // a fraction, not a percentage
    CHECK(c.at("vpp").get<int>() >= 1);
    CHECK(c.at("memory_gb").get<double>() <= 80.0);
    CHECK(c.at("tp").get<int>() * c.at("cp").get<int>() * c.at("dp").get<int>() *
              c.at("pp").get<int>() ==
          128);
    CHECK(c.at("etp").get<int>() * c.at("ep").get<int>() * c.at("edp").get<int>() *
              c.at("pp").get<int>() ==
          128);
    if (i > 0)
      CHECK(configs[i - 1].at("tokens_per_s_per_gpu").get<double>() >=
            c.at("tokens_per_s_per_gpu").get<double>());
  }
  // The paper's folding is the planner's first choice for Mixtral-8x22B on 128 GPUs.
  CHECK(configs[0].at("tp") == 2);
  CHECK(configs[0].at("pp") == 8);
  CHECK(configs[0].at("ep") == 8);
  CHECK(configs[0].at("etp") == 1);
  CHECK(configs[0].at("folded") == true);
  CHECK(doc.at("best_unfolded").at("folded") == false);
  CHECK(configs[0].at("tokens_per_s_per_gpu").get<double>() >
        doc.at("best_unfolded").at("tokens_per_s_per_gpu").get<double>());
}

TEST_CASE("plan prints a table of the top 10 by default, the best non-folded and a breakdown") {
  auto const r = run_command(
      cli("plan --model qwen2-57b-a14b --gpus 64 --global-batch-size 256 --cluster h200"));
  REQUIRE(r.status == 0);
  CHECK(r.out.find("rank  TP  CP  PP VPP") != std::string::npos);
  CHECK(r.out.find("\n  10 ") != std::string::npos);
  CHECK(r.out.find("\n  11 ") == std::string::npos);
  CHECK(r.out.find("best non-folded") != std::string::npos);
  CHECK(r.out.find("ep  all-to-all") != std::string::npos);
  CHECK(r.out.find("x h200 (141 GB)") != std::string::npos);
}

TEST_CASE("plan --explain prices the folding given by the groups flags") {
  auto const r = run_command(
      cli("plan --explain --model mixtral-8x22b-g8t8 --gpus 128 --global-batch-size 256 "
          "--tp 2 --pp 8 --ep 8"));  // ETP defaults to TP, as in `moefold groups`
  REQUIRE(r.status == 0);
  CHECK(r.out.find("TP2 CP1 PP8") != std::string::npos);
  CHECK(r.out.find("EP8 ETP2 (DP8 EDP1)") != std::string::npos);
  CHECK(r.out.find("not folded") != std::string::npos);
  // EP stride 2: the EP group leaves the node; the mesh algebra says so.
  CHECK(r.out.find("8 ranks over 2 nodes (4 per node, network)") != std::string::npos);

  auto const j = run_command(
      cli("plan --explain --model mixtral-8x22b --world-size 128 --global-batch-size 256 "
          "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 8 "
          "--expert-model-parallel-size 8 --expert-tensor-parallel-size 1 --vpp 1 "
          "--micro-batch-size 1 --json"));
  REQUIRE(j.status == 0);
  auto const doc = nlohmann::json::parse(j.out);
  CHECK(doc.at("vpp") == 1);
  CHECK(doc.at("folded") == true);
  CHECK(doc.at("edp") == 2);
  CHECK(doc.at("breakdown_s").at("etp") == 0.0);
  CHECK(doc.at("breakdown_s").at("bubble").get<double>() > 0.0);
}

TEST_CASE("plan reads model and cluster JSON files") {
  auto const r = run_command(cli("plan --model " + examples("mixtral-8x7b.json") + " --cluster " +
                                 examples("h100-ib200.json") +
                                 " --gpus 64 --global-batch-size 256 --top 3 --json"));
  REQUIRE(r.status == 0);
  auto const doc = nlohmann::json::parse(r.out);
  CHECK(doc.at("configs").size() == 3);
}

TEST_CASE("plan --explain --json gives each stage's state bytes for the precision and optimizer") {
  auto state = [](std::string const& flags) {
    auto const r =
        run_command(cli("plan --explain --json --model " + examples("moefold-train-demo.json") +
                        " --world-size 8 --tp 2 --cp 2 --pp 2 --ep 2 --etp 1 "
                        "--global-batch-size 16 --micro-batch-size 2 " +
                        flags));
    INFO(flags << " -> " << r.err);
    REQUIRE(r.status == 0);
    auto const stages = nlohmann::json::parse(r.out).at("state_per_stage_bytes");
    REQUIRE(stages.size() == 2);  // one entry per pipeline stage
    return stages;
  };
  // W8 TP2 CP2 PP2 EP2 ETP1, demo model: the last stage holds 854656 parameters (the test of
  // test_train_demo compares these figures with moefold-train's own).
  double const n = 854656;
  auto const fp32 = state("--fp32 --no-use-distributed-optimizer")[1];
  CHECK(fp32.at("weights").get<double>() == 4 * n);
  CHECK(fp32.at("gradients").get<double>() == 4 * n);
  CHECK(fp32.at("optimizer").get<double>() == 8 * n);
  auto const bf16 = state("--bf16 --no-use-distributed-optimizer")[1];
  CHECK(bf16.at("weights").get<double>() == 2 * n);
  CHECK(bf16.at("optimizer").get<double>() == 12 * n);
  // The defaults are the paper's: BF16, distributed optimizer (sharded: less state).
  auto const paper = state("")[1];
  CHECK(paper.at("weights").get<double>() == 2 * n);
  CHECK(paper.at("optimizer").get<double>() < 12 * n);
  // moefold's distributed optimizer keeps the reduced gradient shards besides.
  auto const moefold = state("--runtime moefold")[1];
  CHECK(moefold.at("gradients").get<double>() > 4 * n);
  CHECK(moefold.at("optimizer").get<double>() == paper.at("optimizer").get<double>());
}

TEST_CASE("invalid plan input exits with status 2 and one line naming the rule") {
  auto const dir = std::filesystem::temp_directory_path();
  auto const bad_key = (dir / "moefold_plan_bad_key.json").string();
  std::ofstream(bad_key) << R"({"num_layers": 2, "hiden_size": 64})";
  auto const missing = (dir / "moefold_plan_missing.json").string();
  std::ofstream(missing) << R"({"num_layers": 2})";
  struct Case {
    std::string args, expected;
  };
  Case const cases[] = {
      {"plan --model gpt-5 --gpus 8 --global-batch-size 8", "unknown model preset 'gpt-5'"},
      {"plan --model mixtral-8x22b --global-batch-size 8", "--gpus is required"},
      {"plan --model mixtral-8x22b --gpus 8", "--global-batch-size is required"},
      {"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8 --cluster a100",
       "unknown cluster preset 'a100'"},
      {"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8 --top 0",
       "--top must be at least 1 (got 0)"},
      {"plan --model " + bad_key + " --gpus 8 --global-batch-size 8",
       "has an unknown key \"hiden_size\""},
      {"plan --model " + missing + " --gpus 8 --global-batch-size 8",
       "lacks the required key \"hidden_size\""},
      {"plan --model mixtral-8x22b --global-batch-size 256 --explain --tp 2", "--explain needs"},
      {"plan --explain --model mixtral-8x22b --gpus 120 --global-batch-size 240 --tp 2 --pp 8",
       "world_size (120) is not divisible by model_size TP·PP·CP = 16"},
      {"plan --explain --model mixtral-8x22b --gpus 128 --global-batch-size 256 --tp 2 --pp 8 "
       "--ep 16 --etp 1",
       "num_experts (8) is not divisible by EP (16)"},
      {"plan --explain --model mixtral-8x22b --gpus 128 --world-size 64 --global-batch-size 256",
       "--gpus (128) and --world-size (64) disagree"},
      {"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8 --runtime deepspeed",
       "--runtime must be megatron or moefold (got 'deepspeed')"},
      {"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8 "
       "--num-distributed-optimizer-instances 2 --no-use-distributed-optimizer",
       "num_distributed_optimizer_instances = 2 needs the distributed optimizer"},
      {"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8 "
       "--num-distributed-optimizer-instances 0",
       "num_distributed_optimizer_instances must be at least 1 (got 0)"},
  };
  for (auto const& c : cases) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
  std::filesystem::remove(bad_key);
  std::filesystem::remove(missing);
}

namespace {
/// A model file: Mixtral-like, with `field` set to the raw JSON `value`.
std::string model_file_with(std::string const& name, std::string const& field,
                            std::string const& value) {
  nlohmann::ordered_json doc = {
      {"num_layers", 32},      {"hidden_size", 4096},          {"num_attention_heads", 32},
      {"num_query_groups", 8}, {"moe_ffn_hidden_size", 14336}, {"num_experts", 8},
      {"moe_router_topk", 2},  {"vocab_size", 32000}};
  std::string text = doc.dump();
  std::string const key = "\"" + field + "\":";
  auto const at = text.find(key);
  if (at == std::string::npos) {
    text.insert(text.size() - 1, "," + key + value);
  } else {
    auto const end = text.find_first_of(",}", at);
    text.replace(at + key.size(), end - at - key.size(), value);
  }
  auto const path = (std::filesystem::temp_directory_path() / name).string();
  std::ofstream(path) << text;
  return path;
}
}  // namespace

TEST_CASE("every numeric field of a model or cluster file is checked for type and range") {
  struct Case {
    std::string field, value, expected;
  };
  // Each used to be read by wrapping or truncating: 2^32+4096 as 4096, -4294967264 as 32,
  // 32.7 as 32, 1e30 as -2147483648.
  Case const cases[] = {
      {"hidden_size", "4294971392",
       "\"hidden_size\" must be an integer between 1 and 2147483647 (got 4294971392)"},
      {"num_layers", "-4294967264",
       "\"num_layers\" must be an integer between 1 and 2147483647 (got -4294967264)"},
      {"num_layers", "32.7",
       "\"num_layers\" must be an integer between 1 and 2147483647 (got 32.7)"},
      {"num_layers", "1e30",
       "\"num_layers\" must be an integer between 1 and 2147483647 (got 1e+30)"},
      {"num_layers", "0", "\"num_layers\" must be an integer between 1 and 2147483647 (got 0)"},
      {"num_experts", "\"8\"",
       "\"num_experts\" must be an integer between 1 and 2147483647 (got \"8\")"},
      {"kv_channels", "-128",
       "\"kv_channels\" must be an integer between 0 and 2147483647 (got -128)"},
      {"swiglu", "1", "\"swiglu\" must be true or false (got 1)"},
      {"name", "7", "\"name\" must be a string (got 7)"},
      {"make_vocab_size_divisible_by", "0",
       "\"make_vocab_size_divisible_by\" must be an integer between 1 and 2147483647 (got 0)"},
      {"add_qkv_bias", "\"yes\"", "\"add_qkv_bias\" must be true or false (got \"yes\")"},
  };
  for (auto const& c : cases) {
    auto const path = model_file_with("moefold_plan_field.json", c.field, c.value);
    auto const r = run_command(cli("plan --model " + path + " --gpus 8 --global-batch-size 8"));
    INFO(c.field << " = " << c.value << " -> " << r.err);
    moefold::test::check_usage_error(r, "model file '" + path + "': " + c.expected);
    std::filesystem::remove(path);
  }
  auto const cluster =
      (std::filesystem::temp_directory_path() / "moefold_cluster_field.json").string();
  for (auto const& [text, expected] : {
           std::pair<std::string, std::string>{
               R"({"gpus_per_node": 1e9, "peak_tflops": 989, "hbm_gb": 80, "hbm_tb_per_s": 3.35,
                   "nvlink_gb_per_s": 450, "network_gb_per_s": 50})",
               "\"gpus_per_node\" must be an integer between 1 and 1024 (got 1000000000.0)"},
           {R"({"gpus_per_node": 8, "peak_tflops": "989", "hbm_gb": 80, "hbm_tb_per_s": 3.35,
                "nvlink_gb_per_s": 450, "network_gb_per_s": 50})",
            "\"peak_tflops\" must be a number between 0 and 1000000000000 (got \"989\")"},
       }) {
    std::ofstream(cluster) << text;
    auto const r = run_command(
        cli("plan --model mixtral-8x22b --cluster " + cluster + " --gpus 8 --global-batch-size 8"));
    INFO(r.err);
    moefold::test::check_usage_error(r, expected);
  }
  std::filesystem::remove(cluster);
}

TEST_CASE("plan flags are integers in range, and a missing file is named with the reason") {
  struct Case {
    std::string args, expected;
  };
  for (auto const& c : {
           Case{"plan --model mixtral-8x22b --gpus 1e3 --global-batch-size 8",
                "--gpus must be an integer (got '1e3')"},
           Case{"plan --model mixtral-8x22b --gpus 2147483648 --global-batch-size 8",
                "--gpus must be at most 2147483647 (got 2147483648)"},
           Case{"plan --model mixtral-8x22b --gpus 0 --global-batch-size 8",
                "--gpus must be at least 1 (got 0)"},
           Case{"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8.5",
                "--global-batch-size must be an integer (got '8.5')"},
           Case{"plan --model mixtral-8x22b --gpus 8 --global-batch-size 8 --seq-length -1",
                "--seq-length must be at least 1 (got -1)"},
           Case{"plan --explain --model mixtral-8x22b --gpus 8 --global-batch-size 8 --vpp 0",
                "--virtual-pipeline-model-parallel-size must be at least 1 (got 0)"},
           Case{"plan --model /nonexistent-dir/model.json --gpus 8 --global-batch-size 8",
                "cannot read model file '/nonexistent-dir/model.json': No such file or directory"},
       }) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
}

TEST_CASE("more GPUs than the model can use is answered at once, with the model's limits") {
  // 2^31 - 1 GPUs used to search for 36 s and answer "no configuration fits in 80 GB".
  for (std::string const mode : {"", "--explain "}) {
    auto const r = run_command(cli("plan " + mode +
                                   "--model mixtral-8x22b --gpus 2147483647 "
                                   "--global-batch-size 256 --seq-length 4096"));
    INFO(r.err);
    moefold::test::check_usage_error(
        r,
        "--gpus 2147483647: at most 29360128 GPUs can hold model 'mixtral-8x22b' usefully: "
        "TP·CP ≤ 2048");
  }
  // Within the limit but with no valid folding: said as such, not as a memory problem.
  auto const prime = run_command(
      cli("plan --model mixtral-8x22b --gpus 1021 --global-batch-size 256 --seq-length 4096"));
  REQUIRE(prime.status == 0);
  CHECK(prime.out.find("no folding of 1021 GPUs meets the model's rules") != std::string::npos);
}

TEST_CASE("plan of a model with 10^9 layers answers at once, every mapping over the HBM") {
  auto const path = model_file_with("moefold_plan_deep.json", "num_layers", "1000000000");
  auto const r = run_command(cli("plan --model " + path + " --gpus 4096 --global-batch-size 256"));
  std::filesystem::remove(path);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("0 configurations priced") != std::string::npos);
  CHECK(r.out.find("no configuration fits in 80 GB per GPU") != std::string::npos);
  // --explain tries each VPP that divides the layers per stage, not every VPP up to 10^9.
  auto const deep = model_file_with("moefold_plan_deep.json", "num_layers", "1000000000");
  auto const e = run_command(cli("plan --explain --model " + deep +
                                 " --gpus 4096 --global-batch-size 256 --tp 8 --pp 512 --json"));
  std::filesystem::remove(deep);
  REQUIRE(e.status == 0);
  CHECK(nlohmann::json::parse(e.out).at("fits") == false);
}
