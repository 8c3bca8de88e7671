#pragma once
// `moefold groups`: the process groups of a folding, as a table, one rank's view, JSON or SVG.

#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "command.hpp"
#include "moefold/mesh/folded_mapping.hpp"

namespace moefold::cli {

/// Registers `moefold groups` and its flags (Megatron's names and short forms) on `app`.
Command add_groups_command(CLI::App& app);

/// Adds the folding flags (--world-size, --tp, --cp, --pp, --ep, --etp, --order,
/// --num-distributed-optimizer-instances) to a sub-command that takes a folding; `world_required`
/// makes --world-size mandatory.
void add_folding_flags(CLI::App& cmd, FoldingConfig& folding, bool world_required = true);

}  // namespace moefold::cli
