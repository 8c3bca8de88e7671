// A rank that never calls a collective: every other rank must get moefold::error with category
// errc::timeout, naming the collective, the group's world ranks and the timeout, and the
// communicator must refuse later calls. The verdicts travel over a second, healthy communicator;
// the job exits 0 only when every waiting rank saw exactly that error. Run with mpiexec -n 4
// (any n ≥ 2).

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
  std::string ranks;
  for (int r = 0; r < size; ++r) ranks += fmt::format("{}{}", r == 0 ? "" : ", ", r);
  for (std::string const& part : {std::string("mpi all_reduce timed out after 1500 ms"),
                                  fmt::format("on the group of world ranks [{}]", ranks)})
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
                                           "collective, its group and the timeout"
                                         : "FAILED");
  return ok ? 0 : 1;
}
