#pragma once
// A picture of a simulated pipeline schedule: one row per stage, one box per forward or backward
// on the logical clock, idle time left blank.

#include <string>

#include "moefold/pipeline/simulation.hpp"

namespace moefold::cli {

/// The SVG document for `timeline`; `title` heads it, `with_chunk` labels boxes `F3c1`.
std::string schedule_svg(PipelineTimeline const& timeline, std::string const& title,
                         bool with_chunk);

}  // namespace moefold::cli
