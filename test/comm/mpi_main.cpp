// Catch2 main of the MPI test executables: MPI is initialized once per process, every process
// runs the same test cases in the same order (the MPI harness needs that), and only world rank 0
// reports, since every process sees every rank's failures. Set MOEFOLD_TEST_ALL_RANKS=1 to let
// every process report.

#define CATCH_CONFIG_RUNNER
#include <cstdlib>

#include "moefold/comm/mpi/environment.hpp"
#include "support/catch.hpp"

int main(int argc, char** argv) {
  moefold::mpi::Environment mpi(&argc, &argv);
  Catch::Session session;
  if (int const rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  if (mpi.world_rank() != 0 && std::getenv("MOEFOLD_TEST_ALL_RANKS") == nullptr)
    session.configData().outputFilename = "/dev/null";
  return session.run();
}
