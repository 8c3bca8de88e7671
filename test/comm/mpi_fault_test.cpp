// Fault injection under mpiexec -n 4: `mpi_fault_test <fault>` runs one all-to-all token dispatch
// on a TP2 × DP2 / EP4 folding inside moefold::mpi::run with a 3 s timeout, and world rank 2
// misbehaves at the dispatch's token all-to-all over ep (test/comm/fault_injection.hpp):
//   throw            — throws: it prints "moefold: rank 2 failed: injected fault …" and aborts;
//   stall            — sleeps 60 s: a peer times out, learns over the side channel that ranks
//                      0 1 3 arrived and rank 2 did not, prints that and aborts the job;
//   other-collective — calls barrier instead: OpenMPI matches the barrier's messages against the
//                      all-to-all's and returns an error (MPI_ERR_TRUNCATE) or the peers time
//                      out; either way the message says what each rank called, e.g. "rank 2
//                      called barrier as collective #1 on this group instead";
//   return           — returns from its function: the peers time out and name rank 2 as a rank
//                      that has returned from the function given to moefold::mpi::run;
//   exit             — calls exit(0) without MPI_Finalize: mpiexec ends the job naming rank 2;
//   dropped-handle   — (no dispatch) every rank starts an all_to_all_v over the world, and rank 2
//                      drops its handle without wait(): it prints why and aborts the job.
// Every case must end the whole job with a non-zero exit status and the failing rank named;
// test/comm/expect_job_fails.cmake checks both (CTest's TIMEOUT turns a hang into a failure).

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "comm/fault_injection.hpp"
#include "moefold/comm/mpi/run.hpp"

using namespace moefold;
using namespace moefold::test;

int main(int argc, char** argv) {
  std::string_view const mode = argc > 1 ? argv[1] : "";
  if (mode == "dropped-handle")
    return mpi::run(&argc, &argv, [](mpi::Communicator& world) {
      std::vector<float> send(4, 1.0f), recv(4);
      std::vector<std::int64_t> counts(4, 1);
      auto h = world.start_all_to_all_v(
          std::span<float const>(send), std::span<std::int64_t const>(counts),
          std::span<float>(recv), std::span<std::int64_t const>(counts));
      if (world.rank() != 2) h.wait();
    });
  FaultPlan plan{.stall = std::chrono::seconds(60), .world_rank = 2};
  bool known = false;
  for (Fault f : {Fault::throw_error, Fault::stall, Fault::other_collective, Fault::return_early,
                  Fault::exit_process})
    if (mode == name(f)) {
      plan.fault = f;
      known = true;
    }
  if (!known) {
    std::fprintf(stderr,
                 "usage: mpi_fault_test throw|stall|other-collective|return|exit|dropped-handle\n");
    return 2;
  }
  auto const faulty = std::make_shared<FaultPlan const>(plan);
  return mpi::run(
      &argc, &argv,
      [&](mpi::Communicator& world) {
        try {
          dispatch_with_fault(world, world.rank() == plan.world_rank ? faulty : nullptr);
        } catch (ReturnEarly const&) {
          return;
        }
        std::fprintf(stderr, "rank %d: the dispatch completed although rank 2 failed in it\n",
                     world.rank());
      },
      {.timeout = std::chrono::seconds(3)});
}
