#pragma once
// Model and cluster descriptions for `moefold plan`: a preset name or a JSON file.

#include <string>

#include "moefold/plan/cluster.hpp"
#include "moefold/plan/model.hpp"

namespace moefold::cli {

/// The model preset called `name_or_file`, or the model described by that JSON file (Megatron's
/// argument names: num_layers, hidden_size, ...). Throws `invalid_config` naming the problem.
ModelSpec load_model(std::string const& name_or_file);

/// The cluster preset called `name_or_file` (h100, h200), or the cluster described by that JSON
/// file. Throws `invalid_config` naming the problem.
ClusterSpec load_cluster(std::string const& name_or_file);

}  // namespace moefold::cli
