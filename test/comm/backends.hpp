#pragma once
// The backend list of the shared communicator tests: the same test bodies run on the
// in-process world (test_comm_inproc) and on OpenMPI processes (test_comm_mpi).

#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "support/catch.hpp"

#if MOEFOLD_TEST_BACKEND_MPI
#include "comm/mpi_harness.hpp"
using Backends = std::tuple<moefold::test::MpiHarness>;
#else
#include "comm/inproc_harness.hpp"
using Backends = std::tuple<moefold::test::InprocHarness>;
#endif

namespace moefold::test {

/// Runs `fn(comm, checks)` on `n` ranks of backend `H` and asserts (on the main thread) that no
/// rank recorded a failure. Skips with a note when the backend cannot provide `n` ranks.
template <class H, class Fn>
void expect_clean(int n, Fn&& fn) {
  auto const failures = H::run(n, std::forward<Fn>(fn));
  if (!failures) {
    WARN(H::name << ": " << n << " ranks not available, skipped");
    return;
  }
  INFO(H::name << " with " << n << " ranks:\n" << fmt::format("{}", fmt::join(*failures, "\n")));
  CHECK(failures->empty());
}

}  // namespace moefold::test
