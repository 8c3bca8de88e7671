#pragma once
// The in-process backend's harness for the shared communicator tests (see rank_checks.hpp).

#include <chrono>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "comm/rank_checks.hpp"
#include "moefold/comm/inproc/run.hpp"

namespace moefold::test {

struct InprocHarness {
  using Comm = inproc::Communicator;
  static constexpr char const* name = "inproc";

  template <class Fn>
  static std::optional<std::vector<std::string>> run(
      int n, Fn fn, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    std::vector<std::vector<std::string>> per_rank(static_cast<std::size_t>(n));
    std::vector<std::string> out;
    try {
      inproc::run(
          n,
          [&](Comm& world) {
            RankChecks checks;
            try {
              fn(world, checks);
            } catch (std::exception const& e) {
              checks.check(false, fmt::format("threw: {}", e.what()));
              per_rank[static_cast<std::size_t>(world.rank())] = checks.failures();
              throw;
            }
            per_rank[static_cast<std::size_t>(world.rank())] = checks.failures();
          },
          {.timeout = timeout});
    } catch (std::exception const& e) {
      out.push_back(fmt::format("world failed: {}", e.what()));
    }
    for (int r = 0; r < n; ++r)
      for (auto const& f : per_rank[static_cast<std::size_t>(r)])
        out.push_back(fmt::format("rank {}: {}", r, f));
    return out;
  }
};

}  // namespace moefold::test
