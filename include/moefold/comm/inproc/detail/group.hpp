#pragma once
/// \file
/// One communicator group of an in-process world: the collective rendezvous and the
/// point-to-point mailboxes.
///
/// A collective takes **one rendezvous**. Each rank posts a `Slot` (its buffers and the call's
/// signature) and arrives (`arrive`, which does not block: a started collective returns here);
/// once every rank has arrived (`await_all`) each rank reads what it needs straight out of its
/// peers' buffers (real copies, or a view for `exchange_view`) and then releases every peer
/// (`release_all`). Before it leaves, a rank whose buffers peers read in place waits until
/// every peer has released it (`await_released`): its buffers stay alive until every reader is done — also when the world
/// aborts meanwhile, or when this rank's own part fails. That second wait is not a rendezvous:
/// a rank waits only for its readers, and the last one wakes it alone.
///
/// A small payload goes **eagerly**: at `arrive` the rank copies its buffer (and its per-peer
/// counts) into a staging buffer of its own in the group, and peers read that copy, so the
/// rank leaves as soon as its own part is done, without waiting for its readers. Slots and
/// staging buffers alternate by epoch parity: readers of epoch e-1 have released before the
/// rendezvous of epoch e completes, and a rank writes epoch e+1's only after that rendezvous.
///
/// A rank that stops waiting at the rendezvous (abort, timeout, a peer that returned) withdraws
/// its arrival first, so no peer can pass the rendezvous and read its buffers; if the
/// rendezvous completed meanwhile, the rank takes part after all.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/detail/fault_message.hpp"
#include "moefold/comm/inproc/detail/world.hpp"
#include "moefold/core/dtype.hpp"
#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace inproc {
namespace detail {

/// What one rank posts for the collective in progress.
struct Slot {
  std::string_view op{};     ///< the collective's name (a string literal)
  std::string_view label{};  ///< the group's name in messages, from the rank's handle
  DType dtype = DType::u8;
  std::size_t count = 0;  ///< element count where all ranks must agree
  int root = 0;           ///< broadcast root, or split colour
  int key = 0;            ///< split key
  void const* send = nullptr;
  std::size_t const* counts = nullptr;  ///< per-peer counts (send counts for all_to_all_v)
};

/// One communicator group: its members, the rendezvous, and the point-to-point mailboxes.
class GroupState {
 public:
  GroupState(std::shared_ptr<World> world, std::vector<int> world_ranks)
      : world_(std::move(world)),
        members_(std::move(world_ranks)),
        ranks_(std::make_unique<RankState[]>(members_.size())) {}

  World& world() noexcept { return *world_; }
  int size() const noexcept { return static_cast<int>(members_.size()); }
  std::vector<int> const& members() const noexcept { return members_; }
  int world_rank(int rank) const noexcept { return members_[static_cast<std::size_t>(rank)]; }
  /// "group ep (world ranks 0 1 2 3)", or "the group of world ranks 0 1 2 3" without a label.
  std::string describe(std::string_view label) const {
    return ::moefold::detail::group_description(label, members_);
  }

  // ---- the collective rendezvous (each call on the rank's own thread) ----------------------

  /// Payloads up to this many bytes go eagerly (copied into the rank's staging buffer).
  static constexpr std::size_t kEagerBytes = std::size_t{64} << 10;
  /// `arrive`'s `stage_bytes` for a collective whose buffers peers read in place.
  static constexpr std::size_t kInPlace = static_cast<std::size_t>(-1);

  /// Posts `slot` for `rank` and arrives at the rank's next collective on this group; returns
  /// its epoch (1, 2, …). Does not wait. Throws if the world has aborted or this rank has a
  /// started collective on the group that it has not waited for. With `stage_bytes` ≤
  /// `kEagerBytes`, the first `stage_bytes` of `slot.send` and the group's size of
  /// `slot.counts` are staged (peers read the copies) and `staged(rank)` is true until the
  /// rank's next arrival: the rank need not wait for its readers.
  std::uint64_t arrive(int rank, Slot slot, std::size_t stage_bytes = kInPlace) {
    if (world_->aborted())
      world_->throw_aborted(world_rank(rank),
                            fmt::format("{} on {}", slot.op, describe(slot.label)));
    RankState& me = at(rank);
    if (!me.started.empty())
      throw error(errc::invalid_argument,
                  fmt::format("inproc: {} on {} while the {} this rank (world rank {}) started on "
                              "the group is not waited for: call wait() on its handle first",
                              slot.op, describe(slot.label), me.started, world_rank(rank)));
    std::uint64_t const e = ++me.epoch;
    me.staged = stage_bytes <= kEagerBytes;
    if (me.staged) {
      std::size_t const parity = e & 1U;
      auto& bytes = me.stage[parity];
      if (bytes.size() < stage_bytes) bytes.resize(stage_bytes);
      if (stage_bytes != 0) std::memcpy(bytes.data(), slot.send, stage_bytes);
      slot.send = bytes.data();
      if (slot.counts != nullptr) {
        auto& counts = me.stage_counts[parity];
        counts.assign(slot.counts, slot.counts + members_.size());
        slot.counts = counts.data();
      }
    }
    me.slots[e & 1U] = slot;
    me.arrived_at.store(e);
    if (arrived_.fetch_add(1) + 1 == e * members_.size())
      for (int q = 0; q < size(); ++q)
        if (q != rank) world_->wake(world_rank(q));
    return e;
  }
  /// Marks (op) or clears (empty) a started collective of `rank` that is not waited for yet.
  void set_started(int rank, std::string_view op) { at(rank).started = op; }

  /// Sleeps until every member has arrived at epoch `e`. Throws (after withdrawing this rank's
  /// arrival) on an abort, on a timeout and when a missing member has returned from its rank
  /// function; the last two fail the world with a message naming who arrived and who did not.
  void await_all(int rank, std::uint64_t e, std::string_view op, std::string_view label) {
    std::uint64_t const target = e * members_.size();
    std::vector<std::string> gone;
    auto const end = world_->block(
        world_rank(rank), [&] { return arrived_.load() >= target; },
        World::Clock::now() + world_->timeout(), /*stop_on_abort=*/true,
        [&] {
          // A missing rank that has returned from its rank function will never come.
          for (int r = 0; r < size(); ++r)
            if (at(r).arrived_at.load() < e && world_->finished(world_rank(r)))
              gone.push_back(
                  fmt::format("rank {} has returned from its rank function", world_rank(r)));
          return !gone.empty();
        });
    if (end == WaitEnd::done || !withdraw(target)) return;
    if (end == WaitEnd::aborted || world_->aborted())
      world_->throw_aborted(world_rank(rank), fmt::format("{} on {}", op, describe(label)));
    if (end == WaitEnd::gave_up)
      fail(rank, e, op, label, errc::communication, "cannot complete", gone);
    fail(rank, e, op, label, errc::timeout,
         fmt::format("timed out after {}", ::moefold::detail::duration_text(world_->timeout())),
         {});
  }

  /// True once every member has arrived at epoch `e`.
  bool all_arrived(std::uint64_t e) const { return arrived_.load() >= e * members_.size(); }

  /// The slot `rank` posted for the collective that `reader` has in progress (valid from the
  /// end of the reader's `await_all` until its `release_all`).
  Slot const& slot(int reader, int rank) const noexcept {
    return at(rank).slots[at(reader).epoch & 1U];
  }
  /// Whether `rank`'s last arrival staged its payload (its own thread only).
  bool staged(int rank) const noexcept { return at(rank).staged; }

  /// Tells every member that this rank is done with its buffers in epoch `e`.
  void release_all(std::uint64_t e) {
    std::uint64_t const target = e * members_.size();
    for (int q = 0; q < size(); ++q)
      if (at(q).released.fetch_add(1) + 1 == target) world_->wake(world_rank(q));
  }

  /// Waits until every member has released this rank's buffers of epoch `e` — also after an
  /// abort (every member passed the rendezvous, so every member releases). Gives up only at
  /// the deadline: quietly once the world has aborted, else failing the world.
  void await_released(int rank, std::uint64_t e, std::string_view op, std::string_view label) {
    std::uint64_t const target = e * members_.size();
    RankState& me = at(rank);
    auto const end = world_->block(
        world_rank(rank), [&] { return me.released.load() >= target; },
        World::Clock::now() + world_->timeout(), /*stop_on_abort=*/false, [] { return false; });
    if (end == WaitEnd::done || world_->aborted()) return;
    std::string const msg = fmt::format(
        "inproc: collective {} over {} timed out after {}: peers did not finish reading the "
        "buffers of world rank {}",
        op, describe(label), ::moefold::detail::duration_text(world_->timeout()), world_rank(rank));
    world_->abort(world_rank(rank), msg);
    throw error(errc::timeout, msg);
  }

  /// Throws the abort error if the world has aborted.
  void throw_if_aborted(int rank, std::string_view op, std::string_view label) const {
    if (world_->aborted())
      world_->throw_aborted(world_rank(rank), fmt::format("{} on {}", op, describe(label)));
  }

  /// The group of split epoch `e` led by group rank `leader`, with the given world ranks: the
  /// first member to ask creates it, the `members`-th takes the last reference out of the
  /// registry.
  std::shared_ptr<GroupState> subgroup(std::uint64_t e, int leader, std::vector<int> world_ranks) {
    std::lock_guard lk(split_mutex_);
    auto const key = std::pair{e, leader};
    auto it = splits_.find(key);
    if (it == splits_.end()) {
      auto const n = static_cast<int>(world_ranks.size());
      it = splits_.emplace(key, std::pair{world_->make_group(std::move(world_ranks), world_), n})
               .first;
    }
    auto g = it->second.first;
    if (--it->second.second == 0) splits_.erase(it);
    return g;
  }

  // ---- point-to-point ------------------------------------------------------------------------

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

  /// Wakes every receiver (after an abort).
  void wake_all() {
    std::lock_guard lk(mutex_);
    cv_.notify_all();
  }

 private:
  /// One member's state, on its own cache line.
  struct alignas(64) RankState {
    std::atomic<std::uint64_t> arrived_at{0};  ///< the last epoch the rank arrived at
    std::atomic<std::uint64_t> released{0};    ///< releases of its buffers (size() per epoch)
    std::uint64_t epoch = 0;                   ///< its collectives so far (its own thread only)
    std::string_view started{};  ///< a started collective not waited for (its own thread only)
    bool staged = false;         ///< the last arrival staged its payload (its own thread only)
    Slot slots[2]{};             ///< by epoch parity
    std::vector<std::byte> stage[2];           ///< staged payloads, by epoch parity
    std::vector<std::size_t> stage_counts[2];  ///< staged per-peer counts, by epoch parity
  };
  RankState& at(int rank) noexcept { return ranks_[static_cast<std::size_t>(rank)]; }
  RankState const& at(int rank) const noexcept { return ranks_[static_cast<std::size_t>(rank)]; }

  /// Takes back one arrival unless the rendezvous of `target` arrivals has completed; true if
  /// it did (no member can pass the rendezvous any more).
  bool withdraw(std::uint64_t target) {
    std::uint64_t v = arrived_.load();
    while (v < target)
      if (arrived_.compare_exchange_weak(v, v - 1)) return true;
    return false;
  }

  /// Fails the world with `category` and "<what>: ranks … arrived, rank … did not<notes>".
  [[noreturn]] void fail(int rank, std::uint64_t e, std::string_view op, std::string_view label,
                         errc category, std::string const& what,
                         std::vector<std::string> const& notes) {
    std::vector<int> arrived, missing;
    for (int r = 0; r < size(); ++r)
      (at(r).arrived_at.load() >= e ? arrived : missing).push_back(world_rank(r));
    std::string const msg = fmt::format(
        "inproc: collective {} over {} {}: {} (this is world rank {})", op, describe(label), what,
        ::moefold::detail::arrival_text(arrived, missing, notes), world_rank(rank));
    world_->abort(world_rank(rank), msg);
    throw error(category, msg);
  }

  std::shared_ptr<World> world_;
  std::vector<int> members_;
  std::unique_ptr<RankState[]> ranks_;
  alignas(64) std::atomic<std::uint64_t> arrived_{0};  ///< arrivals over all epochs
  std::mutex split_mutex_;
  std::map<std::pair<std::uint64_t, int>, std::pair<std::shared_ptr<GroupState>, int>> splits_;
  std::mutex mutex_;  // the mailboxes
  std::condition_variable cv_;
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
    if (!aborted_.load()) {
      failed_rank_ = world_rank;
      reason_ = reason;
      aborted_.store(true);
    }
    groups = live_groups();
  }
  for (auto const& g : groups) g->wake_all();
  wake_everyone();
}

inline void World::finish(int world_rank) {
  std::vector<std::shared_ptr<GroupState>> groups;
  {
    std::lock_guard lk(mutex_);
    finished_[static_cast<std::size_t>(world_rank)] = 1;
    groups = live_groups();
  }
  for (auto const& g : groups) g->wake_all();
  wake_everyone();
}

inline std::shared_ptr<GroupState> World::make_group(std::vector<int> world_ranks,
                                                     std::shared_ptr<World> self) {
  auto g = std::make_shared<GroupState>(std::move(self), std::move(world_ranks));
  std::lock_guard lk(mutex_);
  std::erase_if(groups_, [](auto const& w) { return w.expired(); });
  groups_.push_back(g);
  return g;
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
