#pragma once
// moefold-train's runs with --moe-router-dtype fp64 (a router computing in double), compiled in
// a translation unit of their own (fp64_router.cpp) next to main.cpp's FP32-router runs.

#include "options.hpp"
#include "report.hpp"

namespace moefold::train_demo {

/// This rank's run with an FP64 router, in the precision --bf16 picks. Collective over `world`.
template <class Comm>
void run_with_fp64_router(TrainOptions const& o, Comm& world, Report* report);

}  // namespace moefold::train_demo
