#pragma once
// The checks of moefold-train before any work that look at the machine rather than at the
// numbers alone: the memory a request needs, and the paths on the command line.

#include "options.hpp"

namespace moefold::train_demo {

/// A lower bound of the bytes the run holds at once, summed over all ranks: parameters with
/// their gradients and AdamW moments (each replica), and one microbatch's activations per layer
/// for every DP replica.
double memory_estimate(TrainOptions const& o);

/// Refuses (`invalid_config`, with the estimate) a request whose memory estimate is more than
/// this machine's memory or its cgroup's limit; under MPI one rank's share is compared.
void check_memory(TrainOptions const& o);

/// Checks the paths on the command line without writing anything: --data-path is readable
/// (every file of it), --output-dir and --save are (or can be made) writable directories,
/// --log-json is not a directory and lies in a writable one, --load is a directory. Throws
/// `invalid_config` naming the flag, the path and the reason (strerror).
void check_paths(TrainOptions const& o);

}  // namespace moefold::train_demo
