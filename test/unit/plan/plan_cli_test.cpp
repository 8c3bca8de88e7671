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
  };
  for (auto const& c : cases) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
  std::filesystem::remove(bad_key);
  std::filesystem::remove(missing);
}
