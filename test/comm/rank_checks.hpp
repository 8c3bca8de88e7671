#pragma once
// Checks made inside rank threads or processes. Catch2 v2 is not thread-safe, so a rank never
// calls CHECK/REQUIRE: it records failures here, and the test asserts on the main thread that
// every rank's record is empty.
//
// A backend harness (inproc_harness.hpp, mpi_harness.hpp) provides:
//   struct Harness {
//     using Comm = ...;                         // a moefold::Communicator
//     static constexpr char const* name;        // "inproc" or "mpi"
//     // Runs fn(Comm&, RankChecks&) on `n` ranks (a world of n ranks) and returns the failures
//     // recorded by the ranks that ran in this process, each prefixed with "rank r: ".
//     // `timeout` is the collective timeout for the run. If the backend cannot provide n ranks
//     // (MPI launched with fewer processes), returns std::nullopt and runs nothing.
//     template <class Fn>
//     static std::optional<std::vector<std::string>> run(int n, Fn fn,
//                                                       std::chrono::milliseconds timeout);
//   };

#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace moefold::test {

class RankChecks {
 public:
  /// Records `what` when `ok` is false.
  void check(bool ok, std::string const& what) {
    if (!ok) failures_.push_back(what);
  }
  /// Records a failure when `actual != expected`, printing both.
  template <class A, class B>
  void equal(A const& actual, B const& expected, std::string const& what) {
    if (!(actual == expected))
      failures_.push_back(fmt::format("{}: got {} expected {}", what, actual, expected));
  }
  std::vector<std::string> const& failures() const { return failures_; }

 private:
  std::vector<std::string> failures_;
};

}  // namespace moefold::test
