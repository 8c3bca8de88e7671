#include "moefold/comm/mpi/environment.hpp"

#include <mpi.h>

#include "moefold/core/error.hpp"
#include "mpi_error.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi {

Environment::Environment(int* argc, char*** argv) {
  if (active()) return;
  int provided = 0;
  detail::check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
  owns_ = true;
  detail::check(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN),
                "MPI_Comm_set_errhandler");
}

Environment::~Environment() {
  if (owns_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
}

int Environment::world_rank() const {
  int r = 0;
  detail::check(MPI_Comm_rank(MPI_COMM_WORLD, &r), "MPI_Comm_rank");
  return r;
}

int Environment::world_size() const {
  int n = 0;
  detail::check(MPI_Comm_size(MPI_COMM_WORLD, &n), "MPI_Comm_size");
  return n;
}

bool Environment::active() noexcept {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
