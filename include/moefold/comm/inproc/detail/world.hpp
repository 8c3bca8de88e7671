#pragma once
/// \file
/// The shared state of an in-process world: the abort flag, the timeout, and one `GroupState`
/// per communicator group, through which rank threads meet.
///
/// A collective is a rendezvous in two steps: every rank posts a `Slot` (its buffers and the
/// call's signature) and waits until all have; then each rank copies what it needs straight out
/// of the others' buffers (real copies between ranks) and waits again, so no buffer is released
/// or reused while a peer still reads it. Waits sleep on a condition variable with a deadline;
/// an abort wakes every waiter of every group.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/comm/detail/fault_message.hpp"
#include "moefold/core/dtype.hpp"
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

/// What one rank posts for the collective in progress.
struct Slot {
  std::string_view op{};  ///< the collective's name (a string literal)
  std::string_view label{};  ///< the group's name in messages, from the rank's handle
  DType dtype = DType::u8;
  std::size_t count = 0;  ///< element count where all ranks must agree
  int root = 0;           ///< broadcast root, or split colour
  int key = 0;            ///< split key
  void const* send = nullptr;
  void* recv = nullptr;
  std::size_t const* counts = nullptr;       ///< per-peer counts (send counts for all_to_all_v)
  std::shared_ptr<GroupState> new_group{};  ///< split: the group the leader created
};

/// The world: abort state shared by every group of one `inproc::run`.
class World {
 public:
  World(int size, Options options)
      : size_(size), options_(options), finished_(static_cast<std::size_t>(size), 0) {}

  int size() const noexcept { return size_; }
  std::chrono::milliseconds timeout() const noexcept { return options_.timeout; }
  bool aborted() const noexcept { return aborted_.load(std::memory_order_acquire); }

  /// Records the first failure and wakes every waiting rank. Later calls keep the first reason.
  void abort(int world_rank, std::string const& reason);

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
    throw error(errc::aborted, fmt::format("inproc: rank {} abandoned {} because rank {} failed: {}",
                                           world_rank, during, failed_rank_, reason_));
  }

  /// A new group of the given world ranks (ascending member order = group rank order).
  std::shared_ptr<GroupState> make_group(std::vector<int> world_ranks, std::shared_ptr<World> self);

 private:
  int size_;
  Options options_;
  std::atomic<bool> aborted_{false};
  mutable std::mutex mutex_;
  int failed_rank_ = -1;
  std::string reason_;
  std::vector<char> finished_;  // per world rank: returned from its rank function
  std::vector<std::weak_ptr<GroupState>> groups_;

  std::vector<std::shared_ptr<GroupState>> live_groups();  // under mutex_
};

/// One communicator group: its members, the rendezvous, and the point-to-point mailboxes.
class GroupState {
 public:
  GroupState(std::shared_ptr<World> world, std::vector<int> world_ranks)
      : world_(std::move(world)),
        members_(std::move(world_ranks)),
        here_(members_.size(), 0),
        slots_(members_.size()) {}

  World& world() noexcept { return *world_; }
  /// A new group of the same world (for split).
  std::shared_ptr<GroupState> make_subgroup(std::vector<int> world_ranks) {
    return world_->make_group(std::move(world_ranks), world_);
  }
  int size() const noexcept { return static_cast<int>(members_.size()); }
  std::vector<int> const& members() const noexcept { return members_; }
  int world_rank(int rank) const noexcept { return members_[static_cast<std::size_t>(rank)]; }
  /// "group ep (world ranks 0 1 2 3)", or "the group of world ranks 0 1 2 3" without a label.
  std::string describe(std::string_view label) const {
    return ::moefold::detail::group_description(label, members_);
  }

  /// Posts `slot` for `rank` and sleeps until every member has posted (or the deadline passes,
  /// or the world aborts, both of which throw).
  void arrive(int rank, Slot const& slot) {
    std::unique_lock lk(mutex_);
    slots_[static_cast<std::size_t>(rank)] = slot;
    wait_for_all(lk, rank, slot.op, slot.label);
  }
  /// The second step of a collective: waits until every member has finished reading — even
  /// when the world has aborted meanwhile, since peers may still be copying out of this rank's
  /// buffers (every member passed `arrive`, so every member comes here). Then throws the abort.
  void depart(int rank, std::string_view op, std::string_view label) {
    std::unique_lock lk(mutex_);
    wait_for_all(lk, rank, op, label, /*drain=*/true);
    if (world_->aborted()) {
      lk.unlock();
      world_->throw_aborted(world_rank(rank), fmt::format("{} on {}", op, describe(label)));
    }
  }
  /// The slot `rank` posted for the collective in progress (valid between arrive and depart).
  Slot const& slot(int rank) const noexcept { return slots_[static_cast<std::size_t>(rank)]; }
  /// Writes a split's new group into the leader's own slot (between arrive and depart).
  void publish_group(int rank, std::shared_ptr<GroupState> g) {
    std::lock_guard lk(mutex_);
    slots_[static_cast<std::size_t>(rank)].new_group = std::move(g);
  }

  /// Buffers a message (a real copy) for `dst`; returns at once.
  void post_message(int src, int dst, int tag, void const* data, std::size_t bytes) {
    std::vector<std::byte> msg(bytes);
    if (bytes != 0) std::memcpy(msg.data(), data, bytes);
    {
      std::lock_guard lk(mutex_);
      mail_[{src, dst, tag}].push_back(std::move(msg));
    }
    cv_.notify_all();
  }
  /// Waits for the next message from `src` to `dst` with `tag` and copies it into `data`,
  /// which must be exactly `bytes` long.
  void take_message(int src, int dst, int tag, void* data, std::size_t bytes,
                    std::string_view label);

  /// Wakes every waiter (after an abort).
  void wake_all() {
    std::lock_guard lk(mutex_);
    cv_.notify_all();
  }

 private:
  /// Registers `rank` and sleeps until every member has. Without `drain` an abort ends the wait
  /// at once (throwing); with it the wait goes on until all arrive or the deadline passes.
  void wait_for_all(std::unique_lock<std::mutex>& lk, int rank, std::string_view op,
                    std::string_view label, bool drain = false);
  /// Who arrived at the collective in progress, and who did not, in world ranks (under lk).
  void arrivals(std::vector<int>& arrived, std::vector<int>& missing) const {
    for (int r = 0; r < size(); ++r)
      (here_[static_cast<std::size_t>(r)] ? arrived : missing).push_back(world_rank(r));
  }

  std::shared_ptr<World> world_;
  std::vector<int> members_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::uint64_t generation_ = 0;
  int arrived_ = 0;
  std::vector<char> here_;
  std::vector<Slot> slots_;
  std::map<std::tuple<int, int, int>, std::deque<std::vector<std::byte>>> mail_;
};

inline std::vector<std::shared_ptr<GroupState>> World::live_groups() {
  std::vector<std::shared_ptr<GroupState>> groups;
  for (auto const& w : groups_)
    if (auto g = w.lock()) groups.push_back(std::move(g));
  return groups;
}

inline void World::abort(int world_rank, std::string const& reason) {
  std::vector<std::shared_ptr<GroupState>> groups;
  {
    std::lock_guard lk(mutex_);
    if (!aborted_.load(std::memory_order_relaxed)) {
      failed_rank_ = world_rank;
      reason_ = reason;
      aborted_.store(true, std::memory_order_release);
    }
    groups = live_groups();
  }
  for (auto const& g : groups) g->wake_all();
}

inline void World::finish(int world_rank) {
  std::vector<std::shared_ptr<GroupState>> groups;
  {
    std::lock_guard lk(mutex_);
    finished_[static_cast<std::size_t>(world_rank)] = 1;
    groups = live_groups();
  }
  for (auto const& g : groups) g->wake_all();
}

inline std::shared_ptr<GroupState> World::make_group(std::vector<int> world_ranks,
                                                     std::shared_ptr<World> self) {
  auto g = std::make_shared<GroupState>(std::move(self), std::move(world_ranks));
  std::lock_guard lk(mutex_);
  std::erase_if(groups_, [](auto const& w) { return w.expired(); });
  groups_.push_back(g);
  return g;
}

inline void GroupState::wait_for_all(std::unique_lock<std::mutex>& lk, int rank,
                                     std::string_view op, std::string_view label, bool drain) {
  if (!drain && world_->aborted()) {
    lk.unlock();
    world_->throw_aborted(world_rank(rank), fmt::format("{} on {}", op, describe(label)));
  }
  std::uint64_t const gen = generation_;
  here_[static_cast<std::size_t>(rank)] = 1;
  if (++arrived_ == size()) {
    arrived_ = 0;
    std::fill(here_.begin(), here_.end(), 0);
    ++generation_;
    cv_.notify_all();
    return;
  }
  // Fails the world with `category` and "<what>: ranks … arrived, rank … did not<notes>".
  auto fail = [&](errc category, std::string const& what, std::vector<std::string> const& notes) {
    std::vector<int> arrived, missing;
    arrivals(arrived, missing);
    std::string const msg = fmt::format(
        "inproc: collective {} over {} {}: {} (this is world rank {})", op, describe(label), what,
        ::moefold::detail::arrival_text(arrived, missing, notes), world_rank(rank));
    lk.unlock();
    world_->abort(world_rank(rank), msg);
    throw error(category, msg);
  };
  auto const deadline = std::chrono::steady_clock::now() + world_->timeout();
  while (generation_ == gen) {
    if (!drain && world_->aborted()) {
      lk.unlock();
      world_->throw_aborted(world_rank(rank), fmt::format("{} on {}", op, describe(label)));
    }
    if (!drain) {
      // A missing rank that has returned from its rank function will never come.
      std::vector<std::string> gone;
      for (int r = 0; r < size(); ++r)
        if (!here_[static_cast<std::size_t>(r)] && world_->finished(world_rank(r)))
          gone.push_back(fmt::format("rank {} has returned from its rank function", world_rank(r)));
      if (!gone.empty()) fail(errc::communication, "cannot complete", gone);
    }
    bool const timed_out = cv_.wait_until(lk, deadline) == std::cv_status::timeout;
    if (timed_out && generation_ == gen && drain && world_->aborted()) return;  // give up draining
    if (timed_out && generation_ == gen && !world_->aborted())
      fail(errc::timeout,
           fmt::format("timed out after {}", ::moefold::detail::duration_text(world_->timeout())),
           {});
  }
}

inline void GroupState::take_message(int src, int dst, int tag, void* data, std::size_t bytes,
                                     std::string_view label) {
  std::unique_lock lk(mutex_);
  auto const deadline = std::chrono::steady_clock::now() + world_->timeout();
  auto const key = std::tuple{src, dst, tag};
  // Fails the world: `dst` waited in vain for the message, because of `why`.
  auto fail = [&](errc category, std::string const& why) {
    std::string const msg = fmt::format(
        "inproc: recv on {} {}: world rank {} waited for a message from world rank {} (tag {}) "
        "that never came",
        describe(label), why, world_rank(dst), world_rank(src), tag);
    lk.unlock();
    world_->abort(world_rank(dst), msg);
    throw error(category, msg);
  };
  while (true) {
    if (world_->aborted()) {
      lk.unlock();
      world_->throw_aborted(world_rank(dst), fmt::format("recv from group rank {} (tag {}) on {}",
                                                         src, tag, describe(label)));
    }
    if (auto it = mail_.find(key); it != mail_.end() && !it->second.empty()) {
      std::vector<std::byte> msg = std::move(it->second.front());
      it->second.pop_front();
      lk.unlock();
      if (msg.size() != bytes) {
        std::string const m = fmt::format(
            "inproc: recv on {}: world rank {} expected {} bytes from world rank {} (tag {}) but "
            "the message has {}",
            describe(label), world_rank(dst), bytes, world_rank(src), tag, msg.size());
        world_->abort(world_rank(dst), m);
        throw error(errc::communication, m);
      }
      if (bytes != 0) std::memcpy(data, msg.data(), bytes);
      return;
    }
    if (world_->finished(world_rank(src)))
      fail(errc::communication,
           fmt::format("cannot complete (world rank {} has returned from its rank function)",
                       world_rank(src)));
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
      auto it = mail_.find(key);
      if (it != mail_.end() && !it->second.empty()) continue;
      if (world_->aborted()) continue;
      fail(errc::timeout,
           fmt::format("timed out after {}", ::moefold::detail::duration_text(world_->timeout())));
    }
  }
}

}  // namespace detail
}  // namespace inproc
}  // namespace v0
}  // namespace moefold
