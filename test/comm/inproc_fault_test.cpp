// Fault injection on the in-process world: world rank 2 of 4 misbehaves inside an all-to-all
// token dispatch (test/comm/fault_injection.hpp) — it throws, stalls past the timeout, calls a
// different collective, or returns from its rank function. In every case every rank ends
// (`inproc::run` returns), `run` throws (a failed job), and the errors name rank 2. Rank threads
// only record what they saw; the main thread checks (Catch2 v2 is not thread-safe).

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "comm/fault_injection.hpp"
#include "moefold/comm/inproc/run.hpp"
#include "support/catch.hpp"

using namespace moefold;
using namespace moefold::test;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

namespace {

constexpr int kFaulty = 2;

/// What each rank and `run` ended with.
struct Ending {
  std::string rethrown = "run returned normally";  ///< what `run` threw
  std::vector<std::string> messages = std::vector<std::string>(4, "finished");
  std::vector<errc> categories = std::vector<errc>(4, errc::internal);
};

Ending dispatch_with(Fault fault, std::chrono::milliseconds timeout) {
  Ending out;
  auto const plan = std::make_shared<FaultPlan const>(
      FaultPlan{.fault = fault, .stall = 3 * timeout, .world_rank = kFaulty});
  try {
    inproc::run(4,
                [&](inproc::Communicator& world) {
                  auto const me = static_cast<std::size_t>(world.rank());
                  try {
                    dispatch_with_fault(world, world.rank() == kFaulty ? plan : nullptr);
                  } catch (ReturnEarly const&) {
                    out.messages[me] = "returned early";
                    return;
                  } catch (error const& e) {
                    out.messages[me] = e.what();
                    out.categories[me] = e.category();
                    throw;
                  }
                },
                {.timeout = timeout});
  } catch (std::exception const& e) {
    out.rethrown = e.what();
  }
  return out;
}

}  // namespace

TEST_CASE("inproc faults: a rank that throws inside a dispatch ends every rank, named by all",
          "[comm][inproc][fault]") {
  auto const o = dispatch_with(Fault::throw_error, 10s);
  CHECK(o.rethrown == "injected fault: world rank 2 throws in its all_to_all_v #1");
  for (int r = 0; r < 4; ++r) {
    if (r == kFaulty) continue;
    INFO("rank " << r);
    CHECK(o.categories[static_cast<std::size_t>(r)] == errc::aborted);
    CHECK_THAT(o.messages[static_cast<std::size_t>(r)],
               Contains("because rank 2 failed: injected fault"));
  }
}

TEST_CASE("inproc faults: a rank stalled past the timeout is named as the one that did not arrive",
          "[comm][inproc][fault]") {
  auto const o = dispatch_with(Fault::stall, 1s);
  CHECK_THAT(o.rethrown, Contains("inproc: collective all_to_all_v over group ep (world ranks "
                                  "0 1 2 3) timed out after 1 s: ranks 0 1 3 arrived, rank 2 "
                                  "did not"));
  for (int r = 0; r < 4; ++r) {
    INFO("rank " << r << ": " << o.messages[static_cast<std::size_t>(r)]);
    auto const cat = o.categories[static_cast<std::size_t>(r)];
    if (r == kFaulty) {
      // It wakes up to a world that has already failed.
      CHECK(cat == errc::aborted);
    } else {
      CHECK((cat == errc::timeout || cat == errc::aborted));
    }
    CHECK_THAT(o.messages[static_cast<std::size_t>(r)], Contains("rank 2 did not"));
  }
}

TEST_CASE("inproc faults: a rank that calls a different collective fails every rank, named",
          "[comm][inproc][fault]") {
  auto const o = dispatch_with(Fault::other_collective, 10s);
  CHECK_THAT(o.rethrown, Contains("mismatched collectives on group ep (world ranks 0 1 2 3)"));
  CHECK_THAT(o.rethrown, Contains("world rank 2 called barrier"));
  for (int r = 0; r < 4; ++r) {
    INFO("rank " << r << ": " << o.messages[static_cast<std::size_t>(r)]);
    auto const cat = o.categories[static_cast<std::size_t>(r)];
    CHECK((cat == errc::invalid_argument || cat == errc::aborted));
    CHECK_THAT(o.messages[static_cast<std::size_t>(r)], Contains("world rank 2"));
  }
}

TEST_CASE("inproc faults: a rank that returns from its function mid-step fails its peers at once",
          "[comm][inproc][fault]") {
  // The timeout is far away: the peers learn at once that rank 2 will never come.
  auto const o = dispatch_with(Fault::return_early, 600s);
  // Who else had arrived is a snapshot (a slower peer may not have come yet); rank 2 is named.
  CHECK_THAT(o.rethrown, Contains("inproc: collective all_to_all_v over group ep (world ranks "
                                  "0 1 2 3) cannot complete: "));
  CHECK_THAT(o.rethrown, Contains("did not (rank 2 has returned from its rank function)"));
  CHECK(o.messages[kFaulty] == "returned early");
  for (int r = 0; r < 4; ++r) {
    if (r == kFaulty) continue;
    INFO("rank " << r << ": " << o.messages[static_cast<std::size_t>(r)]);
    auto const cat = o.categories[static_cast<std::size_t>(r)];
    CHECK((cat == errc::communication || cat == errc::aborted));
    CHECK_THAT(o.messages[static_cast<std::size_t>(r)], Contains("rank 2 has returned"));
  }
}
