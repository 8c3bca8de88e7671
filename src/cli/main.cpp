// moefold: command-line tools for MoE Parallel Folding.
//   moefold groups --world-size 8 --tp 2 --cp 2 --pp 2 --ep 4 --etp 1
// Any invalid input exits with status 2 and one line on stderr naming the broken rule.

#include <cstdio>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "command.hpp"
#include "groups_command.hpp"
#include "plan_command.hpp"
#include "moefold/config.hpp"
#include "moefold/core/error.hpp"
#include "schedule_command.hpp"

namespace {
std::string first_line(std::string const& s) { return s.substr(0, s.find('\n')); }
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moefold: process groups and tools for MoE Parallel Folding", "moefold"};
  app.set_version_flag("--version", MOEFOLD_VERSION_STRING);
  app.require_subcommand(1);
  // One line per sub-command.
  std::vector<moefold::cli::Command> const commands{
      moefold::cli::add_groups_command(app),
      moefold::cli::add_plan_command(app),
      moefold::cli::add_schedule_command(app),
  };

  try {
    app.parse(argc, argv);
  } catch (CLI::ParseError const& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    fmt::print(stderr, "moefold: {}\n", first_line(e.what()));
    return 2;
  }
  try {
    for (auto const& c : commands)
      if (c.app->parsed()) return c.run();
  } catch (moefold::error const& e) {
    fmt::print(stderr, "moefold: {}\n", first_line(e.what()));
    return 2;
  } catch (std::exception const& e) {
    fmt::print(stderr, "moefold: {}\n", first_line(e.what()));
    return 1;
  }
  return 2;
}
