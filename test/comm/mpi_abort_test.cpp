// A rank that throws inside moefold::mpi::run ends the whole job: it prints "moefold: rank 1
// failed: <what>" and calls MPI_Abort, which also ends the ranks waiting for it in a barrier.
// CTest passes when that line appears (the job's exit status is non-zero).

#include "moefold/comm/mpi/run.hpp"
#include "moefold/core/error.hpp"

int main(int argc, char** argv) {
  return moefold::mpi::run(&argc, &argv, [](moefold::mpi::Communicator& world) {
    if (world.rank() == 1) throw moefold::error(moefold::errc::internal, "rank 1 gives up");
    world.barrier();  // never completes: rank 1 does not come
  });
}
