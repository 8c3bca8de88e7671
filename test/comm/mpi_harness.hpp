#pragma once
// The MPI harness of the shared communicator tests (interface: rank_checks.hpp). MPI is
// initialized once per process by mpi_main.cpp; every process runs the same Catch2 test cases in
// the same order, so every `run` is entered by every process of MPI_COMM_WORLD.

#include <chrono>
#include <cstdint>
#include <exception>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "comm/rank_checks.hpp"
#include "moefold/comm/mpi/communicator.hpp"

namespace moefold::test {

struct MpiHarness {
  using Comm = moefold::mpi::Communicator;
  static constexpr char const* name = "mpi";

  // Runs fn(Comm&, RankChecks&) on world ranks 0…n−1 (the other processes wait) and returns the
  // failures of all n ranks, on every process. std::nullopt (on every process) when the job has
  // fewer than n processes. The failures travel over the world communicator, not the test world,
  // so a run whose collectives timed out still reports them.
  template <class Fn>
  static std::optional<std::vector<std::string>> run(
      int n, Fn fn, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    Comm& world = world_comm();
    if (world.size() < n) return std::nullopt;
    bool const member = world.rank() < n;
    Comm test_world = world.split(member ? 0 : kUndefinedColor, world.rank());
    std::string mine;  // this rank's failures, each ended by '\0'
    if (member) {
      RankChecks checks;
      try {
        test_world.set_timeout(timeout);
        fn(test_world, checks);
      } catch (std::exception const& e) {
        checks.check(false, fmt::format("threw: {}", e.what()));
      }
      for (auto const& f : checks.failures()) {
        mine += fmt::format("rank {}: {}", world.rank(), f);
        mine.push_back('\0');
      }
    }
    return gather_lines(world, mine);
  }

 private:
  // MPI_COMM_WORLD's duplicate, made by the first `run` (every process calls it first together).
  static Comm& world_comm() {
    static Comm world = [] {
      Comm w = Comm::world();
      w.set_timeout(std::chrono::minutes(10));  // waits while ranks 0…n−1 run a test
      return w;
    }();
    return world;
  }

  // Every process's '\0'-terminated lines, in rank order, on every process.
  static std::vector<std::string> gather_lines(Comm& world, std::string const& mine) {
    std::vector<std::int64_t> counts(static_cast<std::size_t>(world.size()));
    std::int64_t const my_count = static_cast<std::int64_t>(mine.size());
    world.all_gather<std::int64_t>(std::span(&my_count, 1), counts);
    std::int64_t total = 0;
    for (auto c : counts) total += c;
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(total));
    auto const* first = reinterpret_cast<std::uint8_t const*>(mine.data());
    world.all_gather_v<std::uint8_t>(std::span(first, mine.size()), bytes, counts);
    std::vector<std::string> lines;
    std::string line;
    for (auto b : bytes) {
      if (b == 0) {
        lines.push_back(std::move(line));
        line.clear();
      } else {
        line.push_back(static_cast<char>(b));
      }
    }
    return lines;
  }
};

}  // namespace moefold::test
