// moefold-train: the main job. A folded 5-D training run (attention TP·CP·DP·PP, MoE EP·ETP·EDP,
// 1F1B or interleaved pipeline) of a small Mixtral-style model on byte-level English text, with
// checkpoints that load under another folding. By default 8 in-process ranks; `--backend mpi`
// under mpiexec runs one rank per process. See docs/train.md.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/inproc/run.hpp"
#include "moefold/config.hpp"
#include "moefold/core/error.hpp"
#include "fp64_router.hpp"
#include "options.hpp"
#include "preflight.hpp"
#include "report.hpp"
#include "trainer.hpp"

#if MOEFOLD_HAS_MPI
#include "moefold/comm/mpi/run.hpp"
#endif

namespace {

using namespace moefold;
using namespace moefold::train_demo;

/// One line on stderr: usage errors (status 2) as they are, run-time errors (status 1) after
/// "error: ". Line breaks inside a message become spaces, so that it stays one line.
int fail(std::string what, int status) {
  std::replace(what.begin(), what.end(), '\n', ' ');
  fmt::print(stderr, "moefold-train: {}{}\n", status == 1 ? "error: " : "", what);
  return status;
}

/// The last resort: an exception that escapes everything (one thrown by a destructor or a
/// noexcept function) prints one line and ends the process with status 1.
[[noreturn]] void terminate_handler() {
  std::string what = "terminated without an exception";
  if (auto const e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (std::exception const& x) {
      what = x.what();
    } catch (...) {
      what = "unknown exception";
    }
  }
  fail(what, 1);
  std::fflush(stderr);
  std::_Exit(1);
}

/// This rank's run with the router of --moe-router-dtype (FP32 — bf16 logits under --bf16 by
/// default — or FP64, compiled in fp64_router.cpp).
template <class Comm>
void run_trainer(TrainOptions const& o, Comm& world, Report* report) {
  if (o.router_dtype == "fp64")
    run_with_fp64_router<Comm>(o, world, report);
  else
    run_in_precision<RouterOf>(o, world, report);
}

int run_inproc(TrainOptions const& o) {
  Report report(o);
  inproc::run(
      o.world,
      [&](inproc::Communicator& world) {
        run_trainer<inproc::Communicator>(o, world, world.rank() == 0 ? &report : nullptr);
      },
      inproc::Options{.timeout = std::chrono::minutes(o.distributed_timeout_minutes)});
  return 0;
}

#if MOEFOLD_HAS_MPI
int run_mpi(int argc, char** argv, TrainOptions o) {
  int status = 0;
  auto const timeout = std::chrono::minutes(o.distributed_timeout_minutes);
  mpi::run(
      &argc, &argv,
      [&](mpi::Communicator& world) {
        if (o.world > 0 && o.world != world.size()) {
          if (world.rank() == 0)
            fail(fmt::format("--world-size {} differs from the MPI size {}", o.world, world.size()),
                 2);
          status = 2;
          return;
        }
        o.world = world.size();
        // The paths may differ between machines: every rank learns which ranks refused the
        // options, the first of them prints its line, and all return together.
        std::string refused;
        try {
          validate(o);
          check_paths(o);
        } catch (invalid_config const& e) {
          refused = e.what();
        }
        std::vector<double> refusing(static_cast<std::size_t>(world.size()), 0.0);
        refusing[static_cast<std::size_t>(world.rank())] = refused.empty() ? 0.0 : 1.0;
        world.all_reduce(std::span<double>(refusing));
        auto const first =
            std::find_if(refusing.begin(), refusing.end(), [](double x) { return x > 0; });
        if (first != refusing.end()) {
          if (first - refusing.begin() == world.rank()) fail(refused, 2);
          status = 2;
          return;
        }
        Report report(o);
        run_trainer<mpi::Communicator>(o, world, world.rank() == 0 ? &report : nullptr);
      },
      mpi::Options{.timeout = timeout});
  return status;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  std::set_terminate(terminate_handler);
  try {
    auto const parsed = parse_options(argc, argv);
    if (!parsed.options) return parsed.exit_status;
    TrainOptions const& o = *parsed.options;
#if MOEFOLD_HAS_MPI
    if (o.backend == Backend::mpi) return run_mpi(argc, argv, o);
#endif
    validate(o);
    check_paths(o);
    return run_inproc(o);
  } catch (invalid_config const& e) {
    return fail(e.what(), 2);
  } catch (std::bad_alloc const&) {
    return fail("out of memory (std::bad_alloc): use a smaller model, batch or world", 1);
  } catch (std::exception const& e) {
    return fail(e.what(), 1);
  } catch (...) {
    return fail("unknown exception", 1);
  }
}
