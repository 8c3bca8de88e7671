#pragma once
// A picture of a folding: each pipeline stage as a grid in attention coordinates, each rank
// coloured by its EP group and labelled with its MoE coordinates.

#include <string>

#include "moefold/mesh/folded_mapping.hpp"

namespace moefold::cli {

/// The SVG document for `fold`.
std::string groups_svg(FoldedMapping const& fold);

}  // namespace moefold::cli
