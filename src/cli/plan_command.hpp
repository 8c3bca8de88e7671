#pragma once
// `moefold plan`: rank every folding of a model on N GPUs by predicted throughput, or explain
// one folding's predicted cost (--explain).

#include <CLI/CLI.hpp>

#include "command.hpp"

namespace moefold::cli {

/// Registers `moefold plan` and its flags on `app`.
Command add_plan_command(CLI::App& app);

}  // namespace moefold::cli
