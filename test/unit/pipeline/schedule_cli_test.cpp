// `moefold schedule`: JSON equal to the schedules' data, a text timeline and an SVG, exit status 2
// with one line on stderr for any invalid input.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "support/catch.hpp"
#include "support/cli_checks.hpp"
#include "support/run_command.hpp"

using namespace moefold;
using moefold::test::run_command;

namespace {
std::string cli(std::string const& args) { return std::string(MOEFOLD_CLI) + " " + args; }

template <class S>
nlohmann::json expected_json(S const& s) {
  nlohmann::json per_rank = nlohmann::json::object();
  for (int r = 0; r < s.num_stages(); ++r) {
    std::vector<std::string> ops;
    for (auto const& a : s.compute_order(r)) ops.push_back(to_string(a, s.num_chunks() > 1));
    per_rank[std::to_string(r)] = {{"warmup", s.warmup(r)}, {"ops", ops}};
  }
  return {{"per_rank", per_rank}};
}
}  // namespace

TEST_CASE("schedule --json prints 1F1B's per-rank warm-up and ops") {
  auto const r = run_command(cli("schedule --pp 4 --microbatches 8 --json"));
  REQUIRE(r.status == 0);
  auto const doc = nlohmann::json::parse(r.out);
  CHECK(doc.size() == 1);
  CHECK(doc.at("per_rank").size() == 4);
  CHECK(doc.at("per_rank").at("0").at("warmup") == 3);
  CHECK(doc.at("per_rank").at("0").at("ops") ==
        nlohmann::json::parse(R"(["F0","F1","F2","F3","B0","F4","B1","F5","B2","F6","B3","F7",
                                  "B4","B5","B6","B7"])"));
  CHECK(doc == expected_json(OneFOneB{.stages = 4, .microbatches = 8}));
  // --vpp 1 is the same schedule, under Megatron's long flag names.
  auto const same =
      run_command(cli("schedule --pipeline-model-parallel-size 4 --num-microbatches 8 "
                      "--num-virtual-stages-per-pipeline-rank 1 --json"));
  REQUIRE(same.status == 0);
  CHECK(nlohmann::json::parse(same.out) == doc);
}

TEST_CASE("schedule --json prints the interleaved schedule with chunks and clipped warm-up") {
  auto const r = run_command(cli("schedule --pp 4 --vpp 2 --microbatches 8 --json"));
  REQUIRE(r.status == 0);
  auto const doc = nlohmann::json::parse(r.out);
  CHECK(doc.at("per_rank").at("0").at("warmup") == 10);
  CHECK(doc.at("per_rank").at("0").at("ops").at(11) == "B0c1");
  CHECK(doc == expected_json(Interleaved{.stages = 4, .virtual_stages = 2, .microbatches = 8}));

  auto const g = run_command(
      cli("schedule --pp 2 --vpp 3 --microbatches 5 --microbatch-group-size-per-vp-stage 3 "
          "--json"));
  REQUIRE(g.status == 0);
  CHECK(nlohmann::json::parse(g.out) ==
        expected_json(Interleaved{
            .stages = 2, .virtual_stages = 3, .microbatches = 5, .microbatch_group_size = 3}));
  auto const clipped = run_command(cli("schedule --pp 4 --vpp 2 --microbatches 4 --json"));
  REQUIRE(clipped.status == 0);
  CHECK(nlohmann::json::parse(clipped.out).at("per_rank").at("0").at("warmup") == 8);
}

TEST_CASE("schedule --pp 1 runs forward then backward per microbatch") {
  auto const r = run_command(cli("schedule --pp 1 --microbatches 3 --json"));
  REQUIRE(r.status == 0);
  CHECK(nlohmann::json::parse(r.out) ==
        nlohmann::json::parse(
            R"({"per_rank":{"0":{"warmup":0,"ops":["F0","B0","F1","B1","F2","B2"]}}})"));
}

TEST_CASE("schedule prints a timeline with the bubble beside the ideal, and an SVG") {
  auto const r = run_command(cli("schedule --pp 4 --microbatches 8"));
  REQUIRE(r.status == 0);
  CHECK(r.out.find("0           3  F0 F1 F2 F3 B0 F4") != std::string::npos);
  CHECK(r.out.find("stage 3   .........F0|B0---|F1|") != std::string::npos);
  CHECK(r.out.find("idle fraction 36/132 = 0.2727 (ideal (PP-1)/(M+PP-1) = 3/11 = 0.2727)") !=
        std::string::npos);

  auto const v = run_command(cli("schedule --pp 4 --vpp 2 --microbatches 8"));
  REQUIRE(v.status == 0);
  CHECK(v.out.find("= 0.1579 (ideal (PP-1)/(VPP*M+PP-1) = 3/19 = 0.1579)") != std::string::npos);

  std::string const svg_path =
      (std::filesystem::temp_directory_path() / "moefold_schedule_test.svg").string();
  auto const svg = run_command(cli("schedule --pp 2 --vpp 2 --microbatches 4 --svg " + svg_path));
  REQUIRE(svg.status == 0);
  std::string const text = moefold::test::read_text(svg_path);
  CHECK(text.rfind("<svg", 0) == 0);
  CHECK(text.find("</svg>") != std::string::npos);
  CHECK(text.find(">B3c0</text>") != std::string::npos);
  // One box per computation: 2 stages × 2 chunks × 4 microbatches × (F, B).
  std::size_t boxes = 0;
  for (auto at = text.find("stroke='#333'"); at != std::string::npos;
       at = text.find("stroke='#333'", at + 1))
    ++boxes;
  CHECK(boxes == 32);
  std::filesystem::remove(svg_path);
}

TEST_CASE("invalid schedule input exits with status 2 and one line on stderr naming the rule") {
  struct Case {
    std::string args, expected;
  };
  for (auto const& c : {
           Case{"schedule --microbatches 4", "--pipeline-model-parallel-size is required"},
           Case{"schedule --pp 4", "--num-microbatches is required"},
           Case{"schedule --pp 0 --microbatches 4", "PP ≥ 1 (PP = 0)"},
           Case{"schedule --pp 2 --microbatches 0", "M ≥ 1 (M = 0)"},
           Case{"schedule --pp 4 --microbatches 8 --microbatch-group-size 4",
                "needs the interleaved schedule"},
           Case{"schedule --pp 4 --vpp 1 --microbatches 8 --microbatch-group-size 4",
                "needs the interleaved schedule"},
           Case{"schedule --pp 4 --vpp 0 --microbatches 8", "at least 1 (got 0)"},
           Case{"schedule --pp 1 --vpp 2 --microbatches 8", "PP ≥ 2 (PP = 1)"},
           Case{"schedule --pp 4 --vpp 2 --microbatches 10", "M mod Gm = 2 < PP = 4"},
           Case{"schedule --pp 4 --vpp 2 --microbatches 8 --microbatch-group-size 3",
                "Gm = 3 must be at least the pipeline stages PP = 4"},
           Case{"schedule --pp 4 --vpp 2 --microbatches 6 --microbatch-group-size 8",
                "Gm = 8 must not exceed the number of microbatches M = 6"},
           Case{"schedule --pp four --microbatches 8", "pipeline-model-parallel-size"},
       }) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
}

TEST_CASE("schedule sizes are bounded before any work, with the memory they would need") {
  // 2·10^10 computations used to end in "std::bad_alloc".
  auto const r = run_command(cli("schedule --pp 100000 --microbatches 100000 --json"));
  INFO(r.err);
  moefold::test::check_usage_error(
      r,
      "PP·VPP·M = 100000·1·100000: the schedule has 20000000000 computations and would need "
      "~6000.0 GB to simulate and print; at most 1048576 computations");
  auto const vpp = run_command(cli("schedule --pp 1024 --vpp 2 --microbatches 1024"));
  INFO(vpp.err);
  moefold::test::check_usage_error(vpp, "PP·VPP·M = 1024·2·1024");
  auto const svg = run_command(cli("schedule --pp 64 --microbatches 1024 --svg never-drawn.svg"));
  INFO(svg.err);
  moefold::test::check_usage_error(svg, "--svg: a timeline of 131072 computations");
  CHECK_FALSE(std::filesystem::exists("never-drawn.svg"));
  // The largest allowed schedule still runs.
  CHECK(run_command(cli("schedule --pp 8 --microbatches 65536 --json")).status == 0);
}

TEST_CASE("schedule flags are integers in the int range, and --svg names its file") {
  struct Case {
    std::string args, expected;
  };
  for (auto const& c : {
           Case{"schedule --pp 2.5 --microbatches 8",
                "--pipeline-model-parallel-size must be an integer (got '2.5')"},
           Case{"schedule --pp 4 --microbatches 4294967296",
                "--num-microbatches must be at most 2147483647 (got 4294967296)"},
           Case{"schedule --pp 4 --vpp 1e9 --microbatches 8",
                "--num-virtual-stages-per-pipeline-rank must be an integer (got '1e9')"},
           Case{"schedule --pp 2 --microbatches 2 --svg ''", "--svg needs a file name (got '')"},
           Case{"schedule --pp 2 --microbatches 2 --svg /nonexistent-dir/s.svg",
                "cannot write --svg '/nonexistent-dir/s.svg': No such file or directory"},
       }) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
}
