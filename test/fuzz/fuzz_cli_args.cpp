// Fuzz target: the command lines of the `moefold` sub-commands (groups, plan, schedule), parsed
// in-process with the tool's own parsers; the folding flags are also turned into a
// FoldedMapping. Commands are parsed, not run: running one prints, and writes --svg files.
// A bad command line must end in CLI::ParseError or moefold::error.

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "groups_command.hpp"
#include "moefold/core/error.hpp"
#include "plan_command.hpp"
#include "schedule_command.hpp"

namespace {
// The arguments: the input split at '\n', at most 24 of them.
std::vector<std::string> split(std::uint8_t const* data, std::size_t size) {
  std::vector<std::string> args{"moefold"};
  std::string cur;
  for (std::size_t i = 0; i < size && args.size() < 25; ++i) {
    if (data[i] == '\n') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += static_cast<char>(data[i]);
    }
  }
  if (!cur.empty() && args.size() < 25) args.push_back(cur);
  return args;
}

std::vector<char*> argv_of(std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  return argv;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  auto args = split(data, size);
  {  // the tool's parser, as main.cpp builds it
    CLI::App app{"moefold", "moefold"};
    app.require_subcommand(1);
    // The commands own the options their parsers write: keep them alive while parsing.
    std::vector<moefold::cli::Command> const commands{moefold::cli::add_groups_command(app),
                                                      moefold::cli::add_plan_command(app),
                                                      moefold::cli::add_schedule_command(app)};
    auto argv = argv_of(args);
    try {
      app.parse(static_cast<int>(args.size()), argv.data());
    } catch (CLI::ParseError const&) {
    } catch (moefold::error const&) {  // a flag's value checked while parsing
    }
  }
  {  // the folding flags, into a folding
    CLI::App app{"folding", "folding"};
    moefold::FoldingConfig folding;
    moefold::cli::add_folding_flags(app, folding, false);
    app.allow_extras();
    auto argv = argv_of(args);
    try {
      app.parse(static_cast<int>(args.size()), argv.data());
      if (folding.world <= 4096) (void)moefold::FoldedMapping::from(folding);
    } catch (CLI::ParseError const&) {
    } catch (moefold::error const&) {
    }
  }
  return 0;
}
