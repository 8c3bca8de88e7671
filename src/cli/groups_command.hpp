#pragma once
// `moefold groups`: the process groups of a folding, as a table, one rank's view, JSON or SVG.

#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "moefold/mesh/folded_mapping.hpp"

namespace moefold::cli {

struct GroupsOptions {
  FoldingConfig folding;
  bool world_given = false;
  std::optional<int> rank;
  std::string svg_path;
  bool json = false;
};

/// Registers the sub-command and its flags (Megatron's names and short forms) on `app`.
CLI::App* add_groups_command(CLI::App& app, GroupsOptions& options);

/// Runs it; throws moefold::error on invalid input.
int run_groups(GroupsOptions const& options);

/// Adds the folding flags shared by sub-commands that take a folding.
void add_folding_flags(CLI::App& cmd, FoldingConfig& folding);

}  // namespace moefold::cli
