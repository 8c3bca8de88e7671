#pragma once
/// \file
/// `moefold::mpi::run`: the main function of an MPI program built on moefold.

#include <functional>

#include "moefold/comm/mpi/communicator.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi {

/// Initializes MPI (unless it already is), runs `fn` with the world communicator
/// (`Communicator::world()`), and finalizes MPI when it initialized it. Returns 0.
///
/// When `fn` throws on any rank, that rank prints "moefold: rank R failed: <what>" to stderr and
/// ends the whole job with `MPI_Abort(MPI_COMM_WORLD, 1)`: the other ranks may be waiting in a
/// collective that will never complete, and MPI_Abort is the one way to end them. This is the
/// only place where moefold ends a process.
///
/// Usage: `int main(int argc, char** argv) { return moefold::mpi::run(&argc, &argv, train); }`
/// Collective over MPI_COMM_WORLD: every process must call it.
int run(int* argc, char*** argv, std::function<void(Communicator&)> const& fn);

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
