// moefold-train refuses bad inputs cleanly: every case of moefold_train_bad_inputs.txt ends with
// the exit status the file names (2: usage error, refused before any work; 1: a run-time
// error), within a time limit, by no signal, and with exactly one line on stderr.

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "support/catch.hpp"
#include "support/run_command.hpp"

using moefold::test::run_command;
namespace fs = std::filesystem;

namespace {

struct Case {
  int status = 0;
  std::string args;
  int line = 0;
};

std::vector<Case> read_cases(fs::path const& file) {
  std::vector<Case> out;
  std::ifstream in(file);
  int n = 0;
  for (std::string line; std::getline(in, line);) {
    ++n;
    if (line.empty() || line[0] == '#') continue;
    auto const space = line.find(' ');
    out.push_back({std::stoi(line.substr(0, space)), line.substr(space + 1), n});
  }
  return out;
}

}  // namespace

TEST_CASE("every bad input of moefold-train ends with its exit status and one line on stderr",
          "[train][cli][bad_inputs]") {
  auto const cases = read_cases(MOEFOLD_BAD_INPUTS);
  REQUIRE(cases.size() >= 40);
  fs::path const dir = fs::temp_directory_path() / fmt::format("moefold_bad_inputs_{}", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (auto const& c : cases) {
    // A scratch --output-dir and --log-json unless the case is about them.
    std::string extra;
    if (c.args.find("--output-dir") == std::string::npos)
      extra += fmt::format(" --output-dir {}", (dir / fmt::format("out{}", c.line)).string());
    if (c.args.find("--log-json") == std::string::npos)
      extra += fmt::format(" --log-json {}", (dir / fmt::format("log{}.jsonl", c.line)).string());
    // `timeout` ends a hang with status 124; a signal shows as 128 + its number.
    auto const r = run_command(
        fmt::format("timeout -k 10 300 {} {}{} </dev/null", MOEFOLD_TRAIN, c.args, extra));
    INFO("line " << c.line << ": moefold-train " << c.args << "\nstderr: " << r.err);
    CHECK(r.status == c.status);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(r.err.rfind("moefold-train: ", 0) == 0);
    if (c.status == 2) CHECK(r.out.empty());  // refused before any work
  }
  fs::remove_all(dir);
}
