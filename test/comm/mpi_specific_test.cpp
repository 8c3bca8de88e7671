// What is specific to the OpenMPI communicator: handles share one MPI_Comm, its timeout and its
// traffic counters; groups know their world ranks; null communicators refuse collectives.
// (Timeouts and aborts end a job, so they run as their own programs: mpi_timeout_test.cpp and
// mpi_abort_test.cpp.)

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "comm/mpi_harness.hpp"
#include "moefold/comm/mpi/communicator.hpp"
#include "support/catch.hpp"

using namespace moefold;
using moefold::test::MpiHarness;
using moefold::test::RankChecks;
using Comm = mpi::Communicator;

namespace {

void expect_clean(int n, std::optional<std::vector<std::string>> const& failures) {
  if (!failures) {
    WARN("mpi: " << n << " ranks not available, skipped");
    return;
  }
  INFO(fmt::format("{}", fmt::join(*failures, "\n")));
  CHECK(failures->empty());
}

std::string message_of(auto&& call) {
  try {
    call();
  } catch (error const& e) {
    return fmt::format("{}: {}", to_string(e.category()), e.what());
  }
  return "no error";
}

}  // namespace

TEST_CASE("mpi: the world communicator duplicates MPI_COMM_WORLD, every rank in order", "[mpi]") {
  // Every process runs this test case, so world() (collective over MPI_COMM_WORLD) is legal.
  Comm world = Comm::world();
  CHECK(world.valid());
  CHECK(world.rank() >= 0);
  CHECK(world.rank() < world.size());
  std::vector<int> expected(static_cast<std::size_t>(world.size()));
  for (int r = 0; r < world.size(); ++r) expected[static_cast<std::size_t>(r)] = r;
  CHECK(world.world_ranks() == expected);
  CHECK(world.timeout() == std::chrono::minutes(10));  // Megatron's default
  CHECK(Comm::world({.timeout = std::chrono::seconds(7)}).timeout() == std::chrono::seconds(7));
  world.barrier();
}

TEST_CASE("mpi: copies of a handle share the communicator, its timeout and its traffic", "[mpi]") {
  expect_clean(
      2, MpiHarness::run(2, [](Comm& comm, RankChecks& checks) {
        Comm copy = comm;
        copy.set_timeout(std::chrono::milliseconds(4321));
        checks.equal(comm.timeout().count(), std::int64_t{4321},
                     "timeout seen through the original");
        comm.reset_traffic();
        std::vector<float> x(3, 1.0f);
        copy.all_reduce(std::span<float>(x));
        checks.equal(comm.traffic()[CollectiveKind::all_reduce].calls, std::uint64_t{1},
                     "all_reduce counted through the copy");
        checks.equal(comm.traffic()[CollectiveKind::all_reduce].bytes_sent, std::uint64_t{12},
                     "bytes sent");
        checks.equal(x[0], 2.0f, "all_reduce through the copy");
        // A split inherits the timeout and starts with its own counters.
        Comm sub = comm.split(0, 0);
        checks.equal(sub.timeout().count(), std::int64_t{4321}, "timeout inherited by split");
        checks.equal(sub.traffic().total_sent(), std::uint64_t{0}, "split starts with no traffic");
        auto const bad = message_of([&] { copy.set_timeout(std::chrono::milliseconds(0)); });
        checks.check(bad.find("the timeout must be positive (got 0 ms)") != std::string::npos, bad);
      }));
}

TEST_CASE("mpi: a split knows its members' world ranks", "[mpi]") {
  expect_clean(
      4, MpiHarness::run(4, [](Comm& comm, RankChecks& checks) {
        // Odd ranks, in reverse order.
        Comm odd = comm.split(comm.rank() % 2 == 1 ? 0 : kUndefinedColor, -comm.rank());
        if (comm.rank() % 2 == 1) {
          checks.equal(fmt::format("{}", odd.world_ranks()), std::string("[3, 1]"), "world ranks");
        } else {
          checks.check(odd.world_ranks().empty(), "a null communicator has no world ranks");
        }
      }));
}

TEST_CASE("mpi: a null communicator has no rank and refuses collectives", "[mpi]") {
  expect_clean(
      2, MpiHarness::run(2, [](Comm& comm, RankChecks& checks) {
        Comm none = comm.split(kUndefinedColor, 0);
        checks.equal(none.valid(), false, "valid");
        checks.equal(none.rank(), -1, "rank");
        checks.equal(none.size(), 0, "size");
        auto const m = message_of([&] { none.barrier(); });
        checks.check(m.find("invalid_argument: barrier on a null communicator") !=
                         std::string::npos,
                     m);
        Comm default_constructed;
        checks.equal(default_constructed.valid(), false, "a default-constructed handle is null");
      }));
}
