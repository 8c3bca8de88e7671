#pragma once
/// \file
/// MPI start-up and shut-down for programs run with `mpiexec` (component `moefold::mpi`).
/// mpi.h stays out of public headers.

namespace moefold {
inline namespace v0 {
namespace mpi {

/// Initializes MPI for the lifetime of the object (thread level MPI_THREAD_SERIALIZED) unless it
/// is already initialized, and finalizes it on destruction when this object initialized it.
/// Errors on the world communicator are returned, not fatal (MPI_ERRORS_RETURN).
class Environment {
 public:
  Environment(int* argc, char*** argv);
  ~Environment();
  Environment(Environment const&) = delete;
  Environment& operator=(Environment const&) = delete;

  /// This process's rank in MPI_COMM_WORLD.
  int world_rank() const;
  /// The number of processes in MPI_COMM_WORLD.
  int world_size() const;
  /// True between MPI_Init and MPI_Finalize.
  static bool active() noexcept;

 private:
  bool owns_ = false;
};

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
