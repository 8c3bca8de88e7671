#pragma once
/// \file
/// The shared state of an in-process world: the abort flag, the timeout, which ranks have
/// returned from their rank function, and one `Waiter` per rank thread, where the rank sleeps
/// when it has to wait (group.hpp holds the groups through which rank threads meet).
///
/// A wait spins briefly (128 pauses, a few microseconds), then sleeps on the rank's own condition
/// variable with a deadline; whoever completes what a rank waits for wakes that rank alone (no
/// wake-up storm with many rank threads on few cores). An abort or a rank's return wakes every
/// rank.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace inproc {

/// Settings of an in-process world.
struct Options {
  /// How long a rank waits in a collective or receive before the world fails with an error
  /// naming the ranks that arrived and those that did not. The default is Megatron's
  /// `--distributed-timeout-minutes` default, 10 minutes.
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
};

namespace detail {

class GroupState;

/// Where one rank thread sleeps. `sleeping` lets a waker skip the lock when nobody sleeps.
struct alignas(64) Waiter {
  std::mutex mutex;
  std::condition_variable cv;
  std::atomic<bool> sleeping{false};
};

/// A started collective of a rank, which the rank advances whenever it waits (in any group):
/// once its rendezvous is complete, `progress` does the rank's part, so a peer blocked in the
/// same collective is not held up until the rank calls `wait()`.
struct Pending {
  virtual void progress() = 0;

 protected:
  ~Pending() = default;
};

/// How a wait ended.
enum class WaitEnd { done, aborted, timed_out, gave_up };

/// The world: abort state and waiters shared by every group of one `inproc::run`.
class World {
 public:
  using Clock = std::chrono::steady_clock;

  World(int size, Options options)
      : size_(size), options_(options), finished_(static_cast<std::size_t>(size), 0) {
    waiters_.reserve(static_cast<std::size_t>(size));
    for (int r = 0; r < size; ++r) waiters_.push_back(std::make_unique<Waiter>());
  }

  int size() const noexcept { return size_; }
  std::chrono::milliseconds timeout() const noexcept { return options_.timeout; }
  bool aborted() const noexcept { return aborted_.load(); }

  /// Records the first failure and wakes every waiting rank. Later calls keep the first reason.
  void abort(int world_rank, std::string const& reason);
  /// The first failure's reason (empty while the world has not aborted).
  std::string reason() const {
    std::lock_guard lk(mutex_);
    return reason_;
  }

  /// Records that `world_rank` has returned from its rank function and wakes every waiting
  /// rank: a peer that waits for it in a collective or a receive fails at once, naming it.
  void finish(int world_rank);
  /// True once `world_rank` has returned from its rank function.
  bool finished(int world_rank) const {
    std::lock_guard lk(mutex_);
    return finished_[static_cast<std::size_t>(world_rank)] != 0;
  }

  /// Throws the `aborted` error for a rank that was waiting in `during`.
  [[noreturn]] void throw_aborted(int world_rank, std::string_view during) const {
    std::lock_guard lk(mutex_);
    throw error(errc::aborted,
                fmt::format("inproc: rank {} abandoned {} because rank {} failed: {}", world_rank,
                            during, failed_rank_, reason_));
  }

  /// A new group of the given world ranks (ascending member order = group rank order).
  std::shared_ptr<GroupState> make_group(std::vector<int> world_ranks, std::shared_ptr<World> self);

  /// Wakes `world_rank` if it sleeps (call after changing what it waits for).
  void wake(int world_rank) {
    Waiter& w = *waiters_[static_cast<std::size_t>(world_rank)];
    if (!w.sleeping.load()) return;
    std::lock_guard lk(w.mutex);
    w.cv.notify_one();
  }

  /// Registers (or removes) a started collective of `world_rank` (on its own thread).
  void add_pending(int world_rank, Pending* p) {
    pending_[static_cast<std::size_t>(world_rank)].push_back(p);
  }
  void remove_pending(int world_rank, Pending* p) {
    std::erase(pending_[static_cast<std::size_t>(world_rank)], p);
  }

  /// Waits on `world_rank`'s thread until `done()` holds or `deadline` passes, advancing the
  /// rank's started collectives meanwhile. With
  /// `stop_on_abort` an abort ends the wait; `give_up()` (checked before each sleep, not under
  /// any lock of the world) ends it when the awaited event can no longer come.
  template <class Done, class GiveUp>
  WaitEnd block(int world_rank, Done&& done, Clock::time_point deadline, bool stop_on_abort,
                GiveUp&& give_up) {
    // Spin briefly (a peer on another core is often a few microseconds away), then sleep. No
    // yields: with more rank threads than cores, a yield hands the core to another process for
    // a whole time slice, while a sleeper is woken (and scheduled) as soon as it is notified.
    constexpr int kSpins = 128;
    progress(world_rank);
    for (int i = 0; i < kSpins; ++i) {
      if (done()) return WaitEnd::done;
      pause();
    }
    Waiter& w = *waiters_[static_cast<std::size_t>(world_rank)];
    while (true) {
      progress(world_rank);
      if (done()) return WaitEnd::done;
      if (stop_on_abort && aborted()) return WaitEnd::aborted;
      if (give_up()) return WaitEnd::gave_up;
      std::unique_lock lk(w.mutex);
      w.sleeping.store(true);  // before the last look at `done` (a waker reads it after its change)
      bool timed_out = false;
      if (!done() && !(stop_on_abort && aborted()))
        timed_out = w.cv.wait_until(lk, deadline) == std::cv_status::timeout;
      w.sleeping.store(false);
      lk.unlock();
      if (timed_out && !done()) return WaitEnd::timed_out;
    }
  }

 private:
  static void pause() noexcept {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  void progress(int world_rank) {
    auto& mine = pending_[static_cast<std::size_t>(world_rank)];
    for (std::size_t i = 0; i < mine.size(); ++i) mine[i]->progress();
  }
  void wake_everyone() {
    for (auto& w : waiters_) {
      std::lock_guard lk(w->mutex);
      w->cv.notify_all();
    }
  }
  std::vector<std::shared_ptr<GroupState>> live_groups();  // under mutex_

  int size_;
  Options options_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex mutex_;
  int failed_rank_ = -1;
  std::string reason_;
  std::vector<char> finished_;  // per world rank: returned from its rank function
  std::vector<std::weak_ptr<GroupState>> groups_;
  std::vector<std::unique_ptr<Waiter>> waiters_;  // per world rank
  std::vector<std::vector<Pending*>> pending_ =   // per world rank, its own thread only
      std::vector<std::vector<Pending*>>(static_cast<std::size_t>(size_));
};

}  // namespace detail
}  // namespace inproc
}  // namespace v0
}  // namespace moefold
