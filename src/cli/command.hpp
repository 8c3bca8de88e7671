#pragma once
// A sub-command of the `moefold` tool: its CLI11 app and the action run when it was parsed.
// Each sub-command lives in its own <name>_command.cpp and registers itself in main.cpp.

#include <functional>

#include <CLI/CLI.hpp>

namespace moefold::cli {

struct Command {
  CLI::App* app = nullptr;   ///< the sub-command's parser (owned by the parent app)
  std::function<int()> run;  ///< runs it; throws moefold::error on invalid input
};

}  // namespace moefold::cli
