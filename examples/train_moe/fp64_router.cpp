// moefold-train's runs with --moe-router-dtype fp64 (fp64_router.hpp).

#include "fp64_router.hpp"

#include "moefold/comm/inproc/communicator.hpp"
#include "moefold/config.hpp"
#include "trainer.hpp"
#if MOEFOLD_HAS_MPI
#include "moefold/comm/mpi/communicator.hpp"
#endif

namespace moefold::train_demo {

template <class Comm>
void run_with_fp64_router(TrainOptions const& o, Comm& world, Report* report) {
  run_in_precision<Fp64RouterOf>(o, world, report);
}

template void run_with_fp64_router<inproc::Communicator>(TrainOptions const&,
                                                         inproc::Communicator&, Report*);
#if MOEFOLD_HAS_MPI
template void run_with_fp64_router<mpi::Communicator>(TrainOptions const&, mpi::Communicator&,
                                                      Report*);
#endif

}  // namespace moefold::train_demo
