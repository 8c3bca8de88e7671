// moefold-train: the main job. A folded 5-D training run (attention TP·CP·DP·PP, MoE EP·ETP·EDP,
// 1F1B or interleaved pipeline) of a small Mixtral-style model on byte-level English text, with
// checkpoints that load under another folding. By default 8 in-process ranks; `--backend mpi`
// under mpiexec runs one rank per process. See docs/train.md.
#include <chrono>
#include <cstdio>
#include <exception>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/config.hpp"
#include "moefold/core/error.hpp"
#include "options.hpp"
#include "report.hpp"
#include "trainer.hpp"

#if MOEFOLD_HAS_MPI
#include "moefold/comm/mpi/run.hpp"
#endif

namespace {

using namespace moefold;
using namespace moefold::train_demo;

int fail(char const* what, int status) {
  fmt::print(stderr, "moefold-train: {}{}\n", status == 1 ? "error: " : "", what);
  return status;
}

int run_inproc(TrainOptions const& o) {
  Report report(o);
  // Long steps of big models must not trip the in-process world's deadlock timeout.
  inproc::run(
      o.world,
      [&](inproc::Communicator& world) {
        Trainer<inproc::Communicator> trainer(o, world, world.rank() == 0 ? &report : nullptr);
        trainer.run();
      },
      inproc::Options{.timeout = std::chrono::minutes(30)});
  return 0;
}

#if MOEFOLD_HAS_MPI
int run_mpi(int argc, char** argv, TrainOptions o) {
  int status = 0;
  mpi::run(&argc, &argv, [&](mpi::Communicator& world) {
    if (o.world > 0 && o.world != world.size()) {
      if (world.rank() == 0)
        fail(fmt::format("--world-size {} differs from the MPI size {}", o.world, world.size())
                 .c_str(),
             2);
      status = 2;
      return;
    }
    o.world = world.size();
    try {
      validate(o);
    } catch (invalid_config const& e) {  // the same on every rank: all return
      if (world.rank() == 0) fail(e.what(), 2);
      status = 2;
      return;
    }
    Report report(o);
    Trainer<mpi::Communicator> trainer(o, world, world.rank() == 0 ? &report : nullptr);
    trainer.run();
  });
  return status;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  auto const parsed = parse_options(argc, argv);
  if (!parsed.options) return parsed.exit_status;
  TrainOptions const& o = *parsed.options;
  try {
#if MOEFOLD_HAS_MPI
    if (o.backend == Backend::mpi) return run_mpi(argc, argv, o);
#endif
    validate(o);
    return run_inproc(o);
  } catch (invalid_config const& e) {
    return fail(e.what(), 2);
  } catch (std::exception const& e) {
    return fail(e.what(), 1);
  }
}
