#pragma once
// `moefold schedule`: a pipeline schedule (1F1B or interleaved 1F1B) per stage, as an ASCII
// timeline on the logical clock, JSON, or SVG.

#include <CLI/CLI.hpp>

#include "command.hpp"

namespace moefold::cli {

/// Registers `moefold schedule` and its flags (Megatron's names and short forms) on `app`.
Command add_schedule_command(CLI::App& app);

}  // namespace moefold::cli
