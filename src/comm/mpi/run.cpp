#include "moefold/comm/mpi/run.hpp"

#include <mpi.h>

#include <cstdio>
#include <exception>

#include "moefold/comm/mpi/environment.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi {
namespace {

// Ends the whole job: the other ranks may wait in a collective this rank will never join.
void abort_job(int rank, char const* what) noexcept {
  std::fprintf(stderr, "moefold: rank %d failed: %s\n", rank, what);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

}  // namespace

int run(int* argc, char*** argv, std::function<void(Communicator&)> const& fn,
        Options const& options) {
  Environment environment(argc, argv);
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  try {
    Communicator world = Communicator::world(options);
    fn(world);
    // Peers that still wait for this rank in a collective learn, over the side channel, that it
    // has returned; a peer that never comes here times this barrier out.
    world.finish();
  } catch (std::exception const& e) {
    abort_job(rank, e.what());
    return 1;
  } catch (...) {
    abort_job(rank, "an exception that is not a std::exception");
    return 1;
  }
  return 0;
}

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
