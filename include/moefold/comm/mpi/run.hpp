#pragma once
/// \file
/// `moefold::mpi::run`: the main function of an MPI program built on moefold.

#include <functional>

#include "moefold/comm/mpi/communicator.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi {

/// Initializes MPI (unless it already is), runs `fn` with the world communicator
/// (`Communicator::world(options)`: every collective of it and of its splits times out after
/// `options.timeout`), waits at a final barrier over the world (against the same timeout), and
/// finalizes MPI when it initialized it. Returns 0.
///
/// When `fn` throws on any rank, or a collective times out, that rank prints
/// "moefold: rank R failed: <what>" to stderr and ends the whole job with
/// `MPI_Abort(MPI_COMM_WORLD, 1)`: the other ranks may be waiting in a collective that will
/// never complete, and MPI_Abort is the one way to end them. This is the only place where
/// moefold ends a process. A rank whose `fn` returned while its peers wait for it in a
/// collective sits at the final barrier, and the peers' timeout names it as a rank that
/// returned from `fn`.
///
/// Usage: `int main(int argc, char** argv) { return moefold::mpi::run(&argc, &argv, train); }`
/// or, with Megatron's `--distributed-timeout-minutes`,
/// `moefold::mpi::run(&argc, &argv, train, {.timeout = std::chrono::minutes(minutes)})`.
/// Collective over MPI_COMM_WORLD: every process must call it.
int run(int* argc, char*** argv, std::function<void(Communicator&)> const& fn,
        Options const& options = {});

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
