// `moefold groups`: JSON equal to the group generator, exit status 2 with one line on stderr for
// any invalid input (sizes bounded before any work), status 1 and one line for any other failure.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "moefold/mesh/folded_mapping.hpp"
#include "support/catch.hpp"
#include "support/cli_checks.hpp"
#include "support/run_command.hpp"

using namespace moefold;
using moefold::test::run_command;

namespace {
std::string cli(std::string const& args) { return std::string(MOEFOLD_CLI) + " " + args; }
}  // namespace

TEST_CASE("groups --json prints the config and the 16 groups of the generator") {
  auto const r =
      run_command(cli("groups --world-size 16 --tp 2 --cp 2 --pp 2 --ep 4 --etp 2 --json"));
  REQUIRE(r.status == 0);
  auto const doc = nlohmann::ordered_json::parse(r.out);
  REQUIRE(doc.size() == 2);
  auto const& config = doc.at("config");
  CHECK(config.at("world_size") == 16);
  CHECK(config.at("dp") == 2);
  CHECK(config.at("edp") == 1);
  CHECK(config.at("etp") == 2);
  CHECK(config.at("order") == "tp-cp-ep-dp-pp");
  CHECK(config.at("num_distributed_optimizer_instances") == 1);
  auto const& groups = doc.at("groups");
  REQUIRE(groups.size() == 16);
  CHECK_FALSE(groups.contains("expert_pp"));
  CHECK(groups.at("ep") ==
        nlohmann::ordered_json::parse("[[0,2,4,6],[1,3,5,7],[8,10,12,14],[9,11,13,15]]"));
  auto const f = FoldedMapping::from({.world = 16, .tp = 2, .cp = 2, .pp = 2, .ep = 4, .etp = 2});
  for (Group g : f.catalogue())
    CHECK(groups.at(std::string(name(g))) == nlohmann::ordered_json(f.groups(g)));
  // Keys come in catalogue order.
  auto it = groups.begin();
  for (Group g : f.catalogue()) CHECK((it++).key() == name(g));
}

TEST_CASE("groups --json lists the optimizer-instance groups only with several instances") {
  auto const r =
      run_command(cli("groups --world-size 16 --cp 2 --pipeline-model-parallel-size 2 "
                      "--expert-model-parallel-size 4 --expert-tensor-parallel-size 1 "
                      "--num-distributed-optimizer-instances 2 --order TP-CP-EP-DP-PP --json"));
  REQUIRE(r.status == 0);
  auto const doc = nlohmann::json::parse(r.out);
  CHECK(doc.at("config").at("order") == "tp-cp-ep-dp-pp");
  auto const& groups = doc.at("groups");
  CHECK(groups.size() == 20);
  CHECK(groups.at("inter_partial_edp") ==
        nlohmann::json::parse("[[0,4],[1,5],[2,6],[3,7],[8,12],[9,13],[10,14],[11,15]]"));
}

TEST_CASE("groups prints a table, one rank's view, and an SVG picture") {
  auto const table = run_command(cli("groups --world-size 8 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1"));
  REQUIRE(table.status == 0);
  CHECK(table.out.find("attention  TP2 x CP2 x DP1 x PP2") != std::string::npos);
  CHECK(table.out.find("[0,1,2,3]") != std::string::npos);

  auto const one =
      run_command(cli("groups --world-size 8 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1 --rank 5"));
  REQUIRE(one.status == 0);
  CHECK(one.out.find("attention coordinates: tp 1, cp 0, dp 0, pp 1") != std::string::npos);
  CHECK(one.out.find("MoE coordinates:       etp 0, ep 1, edp 0, pp 1") != std::string::npos);

  std::string const svg_path =
      (std::filesystem::temp_directory_path() / "moefold_groups_test.svg").string();
  auto const svg = run_command(
      cli("groups --world-size 8 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1 --svg " + svg_path));
  REQUIRE(svg.status == 0);
  std::string const text = moefold::test::read_text(svg_path);
  CHECK(text.rfind("<svg", 0) == 0);
  CHECK(text.find("</svg>") != std::string::npos);
  CHECK(std::count(text.begin(), text.end(), '\n') > 8 * 6);  // two cells per rank, each 3 lines
}

TEST_CASE("invalid input exits with status 2 and one line on stderr naming the rule") {
  struct Case {
    std::string args, expected;
  };
  for (auto const& c : {
           Case{"groups --tp 2", "--world-size is required"},
           Case{"groups --world-size 12 --tp 2 --cp 2 --pp 2", "not divisible by model_size"},
           Case{"groups --world-size 8 --ep 3", "expert_tensor_model_pipeline_parallel"},
           Case{"groups --world-size 8 --order tp-foo", "unknown axis name 'foo'"},
           Case{"groups --world-size 8 --tp two", "tensor-model-parallel-size"},
           Case{"groups --world-size 8 --rank 8", "--rank 8 is outside the world of size 8"},
           Case{"groups --world-size 8 --bogus", "bogus"},
           Case{"", "subcommand"},
       }) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
}

TEST_CASE("integer flags are checked for type and int range, naming the flag and the value") {
  struct Case {
    std::string args, expected;
  };
  for (auto const& c : {
           Case{"groups --world-size 2.5", "--world-size must be an integer (got '2.5')"},
           Case{"groups --world-size 1e3", "--world-size must be an integer (got '1e3')"},
           Case{"groups --world-size 2147483648",
                "--world-size must be at most 2147483647 (got 2147483648)"},
           Case{"groups --world-size 99999999999999999999",
                "--world-size must be an integer between"},
           Case{"groups --world-size 8 --etp 4294967298",
                "--expert-tensor-parallel-size must be at most 2147483647 (got 4294967298)"},
           Case{"groups --world-size 8 --rank ''", "--rank must be an integer (got '')"},
       }) {
    auto const r = run_command(cli(c.args));
    INFO(c.args << " -> " << r.err);
    moefold::test::check_usage_error(r, c.expected);
  }
}

TEST_CASE("sizes are bounded before any work, with the memory the request would need") {
  // 2^26 ranks: 16 group kinds of 2^26 members, ~9.7 GB of text; it used to end in bad_alloc.
  auto const big = run_command(cli("groups --world-size 67108864 --json"));
  INFO(big.err);
  moefold::test::check_usage_error(
      big,
      "--world-size 67108864: the group table would need ~9.7 GB (16 group kinds x 67108864 "
      "ranks); at most 1048576 ranks are supported");
  auto const svg = run_command(cli("groups --world-size 8192 --svg never-written.svg"));
  INFO(svg.err);
  moefold::test::check_usage_error(svg, "at most 4096 ranks are drawn");
  CHECK_FALSE(std::filesystem::exists("never-written.svg"));
}

TEST_CASE("an empty --svg is rejected, an unwritable one is named with the reason") {
  moefold::test::check_usage_error(run_command(cli("groups --world-size 8 --svg ''")),
                                   "--svg needs a file name (got '')");
  auto const r = run_command(cli("groups --world-size 8 --svg /nonexistent-dir/folding.svg"));
  INFO(r.err);
  moefold::test::check_usage_error(
      r, "cannot write --svg '/nonexistent-dir/folding.svg': No such file or directory");
}

TEST_CASE("a failure that is not a usage error is one line 'moefold: error: ...' and status 1") {
  if (!std::filesystem::exists("/dev/full")) {
    WARN("no /dev/full here: skipped");
    return;
  }
  // Small output fails when flushed at exit, large output while printing: both are reported.
  for (std::string const world : {"8", "4096"}) {
    auto const r = run_command(cli("groups --world-size " + world + " > /dev/full"));
    INFO(world << " -> " << r.err);
    CHECK(r.status == 1);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.err.rfind("moefold: error: ", 0) == 0);
    CHECK(r.err.find("No space left on device") != std::string::npos);
  }
}
