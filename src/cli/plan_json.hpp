#pragma once
// Model and cluster descriptions for `moefold plan`: a preset name or a JSON file.

#include <string>
#include <string_view>

#include "moefold/plan/cluster.hpp"
#include "moefold/plan/model.hpp"

namespace moefold::cli {

/// The model preset called `name_or_file`, or the model described by that JSON file (Megatron's
/// argument names: num_layers, hidden_size, ...). Throws `invalid_config` naming the problem.
ModelSpec load_model(std::string const& name_or_file);

/// The model described by the JSON `text` (read from `origin`, named in messages). Every
/// integer field is checked for type and range before use: 32.7, 1e30 or 2^32 + 4096 for
/// num_layers is an error naming the key and the value. Throws `invalid_config`.
ModelSpec parse_model(std::string_view text, std::string const& origin);

/// The cluster preset called `name_or_file` (h100, h200), or the cluster described by that JSON
/// file. Throws `invalid_config` naming the problem.
ClusterSpec load_cluster(std::string const& name_or_file);

/// The cluster described by the JSON `text` (read from `origin`), fields checked for type and
/// range as in `parse_model`. Throws `invalid_config`.
ClusterSpec parse_cluster(std::string_view text, std::string const& origin);

}  // namespace moefold::cli
