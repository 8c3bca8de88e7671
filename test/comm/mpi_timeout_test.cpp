// A rank that never calls a collective: every other rank must get moefold::error with category
// errc::timeout, naming the collective, the group's world ranks, the timeout, the ranks that
// arrived and the one that did not, and the communicator must refuse later calls. A receive
// whose sender never sends must time out naming that sender. The verdicts travel over a second,
// healthy communicator; the job exits 0 only when every waiting rank saw exactly that error. Run
// with mpiexec -n 4 (any n ≥ 2).

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/mpi/communicator.hpp"
#include "moefold/comm/mpi/environment.hpp"
#include "moefold/core/error.hpp"

using namespace moefold;

namespace {

constexpr auto kTimeout = std::chrono::milliseconds(1500);

// Empty when `e` is the expected timeout error, else what is wrong with it.
std::string judge(error const& e, int size) {
  std::string const what = e.what();
  std::string ranks, arrived;
  for (int r = 0; r < size; ++r) ranks += fmt::format("{}{}", r == 0 ? "" : " ", r);
  for (int r = 0; r < size - 1; ++r) arrived += fmt::format("{}{}", r == 0 ? "" : " ", r);
  for (std::string const& part :
       {fmt::format("mpi: collective all_reduce over the group of world ranks {} timed out after "
                    "1500 ms: ranks {} arrived, rank {} did not",
                    ranks, arrived, size - 1)})
    if (what.find(part) == std::string::npos)
      return fmt::format("message lacks \"{}\": {}", part, what);
  if (e.category() != errc::timeout)
    return fmt::format("category {} instead of timeout: {}", to_string(e.category()), what);
  return {};
}

}  // namespace

int main(int argc, char** argv) {
  mpi::Environment environment(&argc, &argv);
  int ok = 1;
  int size = 0, rank = 0;
  {
    auto world = mpi::Communicator::world();
    auto verdicts = world.split(0, world.rank());  // stays healthy
    auto p2p = world.split(0, world.rank());       // for the receive that never completes
    p2p.set_group_name("p2p");
    p2p.set_timeout(kTimeout);
    size = world.size();
    rank = world.rank();
    int const absent = size - 1;  // never calls the all_reduce
    world.set_timeout(kTimeout);
    std::string problem;
    if (rank != absent) {
      std::vector<float> x(16, 1.0f);
      auto const start = std::chrono::steady_clock::now();
      try {
        world.all_reduce(std::span<float>(x));
        problem = fmt::format("all_reduce completed although rank {} never called it", absent);
      } catch (error const& e) {
        problem = judge(e, size);
        if (problem.empty() && std::chrono::steady_clock::now() - start < kTimeout)
          problem = "the timeout came before the deadline";
        std::fprintf(stderr, "rank %d got, as expected: [%s] %s\n", rank,
                     std::string(to_string(e.category())).c_str(), e.what());
      }
      if (problem.empty()) {  // the broken communicator refuses further work
        try {
          world.barrier();
          problem = "a barrier on the timed-out communicator did not throw";
        } catch (error const& e) {
          if (std::string(e.what()).find("unusable after an earlier failure") == std::string::npos)
            problem = fmt::format("unexpected error after the timeout: {}", e.what());
        }
      }
    }
    // A receive whose message never comes names the peer it waits for.
    if (problem.empty() && rank == 1) {
      std::vector<float> y(4);
      try {
        p2p.recv(std::span<float>(y), 0, /*tag=*/7);
        problem = "a receive completed although rank 0 never sent";
      } catch (error const& e) {
        std::string const expected = fmt::format(
            "on group p2p (world ranks {}) timed out after 1500 ms: world rank 1 still waits for "
            "the receive from world rank 0 (tag 7)",
            [&] {
              std::string r;
              for (int q = 0; q < size; ++q) r += fmt::format("{}{}", q == 0 ? "" : " ", q);
              return r;
            }());
        if (std::string(e.what()).find(expected) == std::string::npos ||
            e.category() != errc::timeout)
          problem = fmt::format("the receive's error lacks \"{}\": {}", expected, e.what());
        std::fprintf(stderr, "rank %d got, as expected: [%s] %s\n", rank,
                     std::string(to_string(e.category())).c_str(), e.what());
      }
    }
    if (!problem.empty()) {
      std::fprintf(stderr, "rank %d: FAILED: %s\n", rank, problem.c_str());
      ok = 0;
    }
    std::vector<std::int32_t> all_ok{ok};
    verdicts.all_reduce(std::span<std::int32_t>(all_ok), ReduceOp::min);
    ok = all_ok[0];
  }
  if (rank == 0)
    std::printf("timeout test: %s\n", ok ? "every waiting rank got errc::timeout naming the "
                                           "collective, its group, the timeout and who arrived; "
                                           "a lone receive named the peer it waited for"
                                         : "FAILED");
  return ok ? 0 : 1;
}
