#pragma once
/// \file
/// `inproc::run`: runs a function on N rank threads of one process, each with a communicator
/// over the whole world — the embedded backend for tests, examples and the demo.
///
///   moefold::inproc::run(8, [](moefold::inproc::Communicator& world) {
///     std::vector<float> x(4, float(world.rank()));
///     world.all_reduce(std::span<float>(x));   // every rank: 0+1+…+7 = 28
///   });

#include <exception>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>
#include <vector>

#include "moefold/comm/inproc/communicator.hpp"

namespace moefold {
inline namespace v0 {
namespace inproc {

/// Runs `fn(Communicator& world)` on `world_size` threads and returns when all have finished.
/// When a rank throws, the world aborts: the other ranks' pending and later collectives throw
/// `moefold::error` (category aborted) naming the failing rank, and `run` rethrows the first
/// error on the caller's thread. A rank that waits longer than `options.timeout` (default 10
/// minutes) in a collective fails the world with an error naming the ranks that arrived and
/// those that did not; a rank that waits for a peer which has already returned from `fn` fails
/// the world at once, naming that peer. A world that failed without an exception (a rank
/// dropped the handle of a started collective without `wait()`) makes `run` throw the reason.
template <class Fn>
void run(int world_size, Fn&& fn, Options options = {}) {
  MOEFOLD_EXPECTS(world_size >= 1, "inproc::run needs at least one rank (got {})", world_size);
  auto world = std::make_shared<detail::World>(world_size, options);
  std::vector<int> ranks(static_cast<std::size_t>(world_size));
  std::iota(ranks.begin(), ranks.end(), 0);
  auto const group = world->make_group(std::move(ranks), world);

  // The error to rethrow: the first that is not a consequence of another rank's failure.
  std::mutex errors_mutex;
  std::exception_ptr first_error;
  bool first_is_cause = false;
  auto body = [&](int rank) {
    try {
      Communicator comm(group, rank);
      fn(comm);
      world->finish(rank);
    } catch (...) {
      std::string what = "unknown exception";
      bool cause = true;
      try {
        throw;
      } catch (error const& e) {
        what = e.what();
        cause = e.category() != errc::aborted;
      } catch (std::exception const& e) {
        what = e.what();
      } catch (...) {
      }
      {
        std::lock_guard lk(errors_mutex);
        if (!first_error || (cause && !first_is_cause)) {
          first_error = std::current_exception();
          first_is_cause = cause;
        }
      }
      world->abort(rank, what);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(world_size));
  for (int r = 0; r < world_size; ++r) threads.emplace_back(body, r);
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
  // The world can fail without an exception on any rank, e.g. when a rank drops the handle of
  // a started collective without waiting for it.
  if (world->aborted()) throw error(errc::aborted, world->reason());
}

}  // namespace inproc
}  // namespace v0
}  // namespace moefold
