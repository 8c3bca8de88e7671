#pragma once
/// \file
/// `inproc::Communicator`: a group of rank threads of one process (the embedded backend).
/// Copies between ranks are real; reductions run in rank order, so results are bitwise
/// reproducible run to run; a failing or missing rank makes every other rank fail fast.

#include <fmt/format.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/comm/detail/reduce.hpp"
#include "moefold/comm/inproc/detail/group.hpp"

namespace moefold {
inline namespace v0 {
namespace inproc {

/// One rank's handle on a group of an in-process world. Copies share the group and the traffic
/// counters. A default-constructed communicator is null (`valid() == false`), as is the result
/// of `split(kUndefinedColor, …)`.
class Communicator : public CollectiveApi<Communicator> {
 public:
  Communicator() = default;
  /// Rank `rank` of `group` (used by `inproc::run`; users get communicators from it).
  Communicator(std::shared_ptr<detail::GroupState> group, int rank)
      : group_(std::move(group)), rank_(rank), traffic_(std::make_shared<Traffic>()) {}

  /// This rank's index in the group (0 … size()-1).
  int rank() const noexcept { return rank_; }
  /// Number of ranks in the group (0 for a null communicator).
  int size() const noexcept { return group_ ? group_->size() : 0; }
  /// False for a null communicator.
  bool valid() const noexcept { return group_ != nullptr; }
  /// The world ranks of the group's members, in group-rank order.
  std::vector<int> const& world_ranks() const {
    require_valid("world_ranks");
    return group_->members();
  }
  /// The world rank of this rank.
  int world_rank() const { return world_ranks()[static_cast<std::size_t>(rank_)]; }

  /// The name of the group in error messages ("ep", "tp", …; `ProcessGroups` names the groups
  /// it makes); empty by default and for the result of `split`.
  std::string const& group_name() const noexcept { return *name_; }
  /// Names the group for this rank's error messages (shared by this handle's copies; each rank
  /// names its own handle). Not collective.
  void set_group_name(std::string name) { *name_ = std::move(name); }

  // ---- the type-erased interface of CollectiveApi -------------------------------------------
  Traffic& traffic_counters() const noexcept { return *traffic_; }

  void raw_barrier() {
    meet({.op = "barrier"}, 0, [] {});
  }

  void raw_all_reduce(void* data, std::size_t n, DType t, ReduceOp op) {
    std::size_t const bytes = n * size_of(t);
    std::uint64_t const e = arrive(
        {.op = "all_reduce", .dtype = t, .count = n, .root = static_cast<int>(op), .send = data},
        bytes);
    // Peers read a staged copy, or else `data` itself: then the sum goes through `result`.
    std::vector<std::byte> result(group_->staged(rank_) ? 0 : bytes);
    complete(e, "all_reduce", [&] {
      check_same_count_and_root("all_reduce");
      ::moefold::detail::reduce_ordered(t, op, inputs(), 0, n,
                                        result.empty() ? data : result.data());
    });
    if (!result.empty()) std::memcpy(data, result.data(), result.size());
  }

  void raw_broadcast(void* data, std::size_t n, DType t, int root) {
    meet({.op = "broadcast", .dtype = t, .count = n, .root = root, .send = data},
         rank_ == root ? n * size_of(t) : 0, [&] {
           check_same_count_and_root("broadcast");
           if (rank_ != root && n != 0) std::memcpy(data, slot(root).send, n * size_of(t));
         });
  }

  void raw_all_gather_v(void const* send, void* recv, std::span<std::size_t const> counts,
                        DType t) {
    meet({.op = "all_gather_v", .dtype = t, .send = send, .counts = counts.data()},
         counts.size() == idx(size()) ? counts[idx(rank_)] * size_of(t) : kInPlace, [&] {
      check_same_counts("all_gather_v", counts);
      auto* out = static_cast<std::byte*>(recv);
      for (int p = 0; p < size(); ++p) {
        std::size_t const bytes = counts[idx(p)] * size_of(t);
        if (bytes != 0) std::memcpy(out, slot(p).send, bytes);
        out += bytes;
      }
    });
  }

  void raw_reduce_scatter_v(void const* send, void* recv, std::span<std::size_t const> counts,
                            DType t, ReduceOp op) {
    meet({.op = "reduce_scatter_v",
          .dtype = t,
          .root = static_cast<int>(op),
          .send = send,
          .counts = counts.data()},
         total_bytes(counts, t), [&] {
           check_same_counts("reduce_scatter_v", counts);
           std::size_t const offset =
               std::accumulate(counts.begin(), counts.begin() + rank_, std::size_t{0});
           ::moefold::detail::reduce_ordered(t, op, inputs(), offset, counts[idx(rank_)], recv);
         });
  }

  void raw_all_to_all_v(void const* send, std::span<std::size_t const> send_counts, void* recv,
                        std::span<std::size_t const> recv_counts, DType t) {
    meet({.op = "all_to_all_v", .dtype = t, .send = send, .counts = send_counts.data()},
         total_bytes(send_counts, t), [&] { pull_blocks(recv, recv_counts, t, "all_to_all_v"); });
  }

  class Started;
  /// The non-blocking all_to_all_v (`CollectiveApi::start_all_to_all_v`): arrives and returns.
  Started raw_start_all_to_all_v(void const* send, std::vector<std::size_t> send_counts, void* recv,
                                 std::vector<std::size_t> recv_counts, DType t);

  /// Zero-copy peer reads (`CollectiveApi::exchange_view`): `fn(starts)` gets, for every peer q,
  /// the start of the block q sends to this rank, inside q's own send buffer.
  static constexpr bool peer_reads = true;
  template <class Fn>
  void raw_exchange_view(void const* send, std::span<std::size_t const> send_counts,
                         std::span<std::size_t const> recv_counts, DType t, Fn&& fn) {
    meet({.op = "exchange_view", .dtype = t, .send = send, .counts = send_counts.data()},
         kInPlace, [&] {
      check_same_signature();
      std::vector<void const*> starts(idx(size()));
      for (int q = 0; q < size(); ++q)
        starts[idx(q)] = peer_block(q, recv_counts, t, "exchange_view");
      fn(std::span<void const* const>(starts));
    });
  }

  void raw_exchange(std::span<P2POp const> ops) {
    require_valid("exchange");
    for (auto const& op : ops)
      if (op.kind == P2POp::Kind::send)
        group_->post_message(rank_, op.peer, op.tag, op.data, op.bytes());
    for (auto const& op : ops)
      if (op.kind == P2POp::Kind::recv)
        group_->take_message(op.peer, rank_, op.tag, op.data, op.bytes(), *name_);
  }

  Communicator raw_split(int color, int key) {
    Communicator out;
    std::uint64_t const e = arrive({.op = "split", .root = color, .key = key}, 0);
    complete(e, "split", [&] {
      check_same_signature();
      // My new group: the ranks with my colour, ordered by (key, old rank).
      std::vector<int> mine;
      for (int q = 0; q < size(); ++q)
        if (color != kUndefinedColor && slot(q).root == color) mine.push_back(q);
      if (mine.empty()) return;
      std::stable_sort(mine.begin(), mine.end(),
                       [&](int a, int b) { return slot(a).key < slot(b).key; });
      std::vector<int> world_ranks;
      for (int q : mine) world_ranks.push_back(group_->world_rank(q));
      auto const pos = std::find(mine.begin(), mine.end(), rank_) - mine.begin();
      out = Communicator(group_->subgroup(e, mine.front(), std::move(world_ranks)),
                         static_cast<int>(pos));
    });
    return out;
  }

 private:
  static std::size_t idx(int r) noexcept { return static_cast<std::size_t>(r); }

  void require_valid(std::string_view what) const {
    if (!group_)
      throw error(errc::invalid_argument, fmt::format("{} on a null communicator", what));
  }
  std::string describe() const { return group_->describe(*name_); }

  static constexpr std::size_t kInPlace = detail::GroupState::kInPlace;

  /// The bytes of `counts` elements of `t` in all (what an eager arrival stages), or
  /// `kInPlace` when `counts` has not one entry per rank (the collective then fails, naming
  /// the counts).
  std::size_t total_bytes(std::span<std::size_t const> counts, DType t) const {
    if (counts.size() != idx(size())) return kInPlace;
    return std::accumulate(counts.begin(), counts.end(), std::size_t{0}) * size_of(t);
  }

  /// Posts `slot` and arrives at this rank's next collective on the group (does not wait);
  /// a payload of `stage_bytes` ≤ `GroupState::kEagerBytes` is staged (group.hpp).
  std::uint64_t arrive(detail::Slot slot, std::size_t stage_bytes = kInPlace) {
    require_valid(slot.op);
    slot.label = *name_;
    return group_->arrive(rank_, slot, stage_bytes);
  }

  /// Completes collective `e`: waits until every rank has arrived, runs `work` (reading the
  /// peers' slots and buffers) and releases the peers. Unless this rank staged its payload,
  /// it then waits until every peer has released it — also when `work` fails, so no buffer
  /// is freed while a peer reads it.
  template <class Work>
  void complete(std::uint64_t e, std::string_view op, Work&& work) {
    group_->await_all(rank_, e, op, *name_);
    bool const staged = group_->staged(rank_);
    std::exception_ptr const failed = run_and_release(e, std::forward<Work>(work));
    if (!staged) return leave(e, op, failed);
    if (failed) std::rethrow_exception(failed);
    group_->throw_if_aborted(rank_, op, *name_);
  }
  /// Runs this rank's part of collective `e` and releases the peers, also when it fails;
  /// returns its error.
  template <class Work>
  std::exception_ptr run_and_release(std::uint64_t e, Work&& work) {
    std::exception_ptr failed;
    try {
      work();
    } catch (...) {
      failed = std::current_exception();
    }
    group_->release_all(e);
    return failed;
  }
  /// Waits until every peer has released this rank, then throws `failed` (this rank's own
  /// error rather than the abort it caused) or the abort.
  void leave(std::uint64_t e, std::string_view op, std::exception_ptr const& failed) {
    if (failed) {
      try {
        group_->await_released(rank_, e, op, *name_);
      } catch (error const&) {
      }
      std::rethrow_exception(failed);
    }
    group_->await_released(rank_, e, op, *name_);
    group_->throw_if_aborted(rank_, op, *name_);
  }

  /// Runs one collective at once: arrive (staging `stage_bytes` of `slot.send` when few
  /// enough), then `complete`.
  template <class Work>
  void meet(detail::Slot slot, std::size_t stage_bytes, Work&& work) {
    std::string_view const op = slot.op;
    complete(arrive(slot, stage_bytes), op, std::forward<Work>(work));
  }

  /// Peer `q`'s slot for the collective this rank has in progress on the group.
  detail::Slot const& slot(int q) const { return group_->slot(rank_, q); }

  /// Where peer `q`'s block for this rank starts in q's send buffer; fails the world when q
  /// sends another count than this rank expects from it.
  void const* peer_block(int q, std::span<std::size_t const> recv_counts, DType t,
                         std::string_view op) {
    detail::Slot const& peer = slot(q);
    std::size_t const sent_to_me = peer.counts[idx(rank_)];
    if (sent_to_me != recv_counts[idx(q)])
      fail(errc::invalid_argument,
           fmt::format("inproc: {} on {}: world rank {} sends {} elements to world rank {}, which "
                       "expects {} from it",
                       op, describe(), group_->world_rank(q), sent_to_me, world_rank(),
                       recv_counts[idx(q)]));
    std::size_t const offset =
        std::accumulate(peer.counts, peer.counts + rank_, std::size_t{0}) * size_of(t);
    return static_cast<std::byte const*>(peer.send) + offset;
  }

  /// Copies every peer's block for this rank into `recv`, in rank order.
  void pull_blocks(void* recv, std::span<std::size_t const> recv_counts, DType t,
                   std::string_view op) {
    check_same_signature();
    auto* out = static_cast<std::byte*>(recv);
    for (int q = 0; q < size(); ++q) {
      void const* from = peer_block(q, recv_counts, t, op);
      std::size_t const bytes = recv_counts[idx(q)] * size_of(t);
      if (bytes != 0) std::memcpy(out, from, bytes);
      out += bytes;
    }
  }

  /// The posted send buffers in rank order.
  std::vector<void const*> inputs() const {
    std::vector<void const*> in(idx(size()));
    for (int q = 0; q < size(); ++q) in[idx(q)] = slot(q).send;
    return in;
  }

  [[noreturn]] void fail(errc category, std::string const& msg) {
    group_->world().abort(world_rank(), msg);
    throw error(category, msg);
  }

  /// Every rank called the same collective with the same element type.
  void check_same_signature() {
    detail::Slot const& mine = slot(rank_);
    for (int q = 0; q < size(); ++q) {
      detail::Slot const& s = slot(q);
      if (s.op != mine.op || s.dtype != mine.dtype) {
        fail(errc::invalid_argument,
             fmt::format("inproc: mismatched collectives on {}: world rank {} called {}<{}> "
                         "while world rank {} called {}<{}>",
                         group_->describe(*name_), world_rank(), mine.op, name(mine.dtype),
                         group_->world_rank(q), s.op, name(s.dtype)));
      }
    }
  }
  void check_same_count_and_root(std::string_view op) {
    check_same_signature();
    detail::Slot const& mine = slot(rank_);
    for (int q = 0; q < size(); ++q) {
      detail::Slot const& s = slot(q);
      if (s.count != mine.count || s.root != mine.root) {
        fail(errc::invalid_argument,
             fmt::format("inproc: {} on {}: world rank {} passed count {} / {} {} but world rank "
                         "{} passed count {} / {} {}",
                         op, group_->describe(*name_), world_rank(), mine.count,
                         op == "broadcast" ? "root" : "op", mine.root, group_->world_rank(q),
                         s.count, op == "broadcast" ? "root" : "op", s.root));
      }
    }
  }
  void check_same_counts(std::string_view op, std::span<std::size_t const> counts) {
    check_same_signature();
    for (int q = 0; q < size(); ++q) {
      detail::Slot const& s = slot(q);
      if (!std::equal(counts.begin(), counts.end(), s.counts) ||
          (op == "reduce_scatter_v" && s.root != slot(rank_).root)) {
        fail(errc::invalid_argument,
             fmt::format("inproc: {} on {}: world ranks {} and {} passed different counts or "
                         "operators",
                         op, group_->describe(*name_), world_rank(), group_->world_rank(q)));
      }
    }
  }

  std::shared_ptr<detail::GroupState> group_;
  int rank_ = -1;
  std::shared_ptr<Traffic> traffic_ = std::make_shared<Traffic>();
  std::shared_ptr<std::string> name_ = std::make_shared<std::string>();
};

/// The handle of a started all_to_all_v (`CollectiveApi::start_all_to_all_v`): `wait()`
/// completes it. Peers may read this rank's send buffer from the start on, and its receive
/// buffer is written in `wait()`: neither may be touched until `wait()` returns, and the
/// rank may start no other collective on the same group before. A handle dropped without
/// `wait()` fails the world ("… dropped the handle … without wait()"); while an exception
/// unwinds the stack it completes the collective quietly instead.
class Communicator::Started {
 public:
  Started(Started&&) noexcept = default;
  Started& operator=(Started&&) = delete;
  Started(Started const&) = delete;
  Started& operator=(Started const&) = delete;
  ~Started() {
    if (!s_) return;
    if (std::uncaught_exceptions() <= s_->uncaught) {
      Communicator& c = s_->comm;
      c.group_->world().abort(
          c.world_rank(), fmt::format("inproc: world rank {} dropped the handle of a started {} "
                                      "on {} without wait()",
                                      c.world_rank(), s_->op, c.describe()));
    }
    try {
      finish();
    } catch (...) {
    }
  }
  /// Completes the collective; errors (a failed peer, a timeout, mismatched counts) come out
  /// here, with the messages of the blocking form. Call it once.
  void wait() {
    if (!s_)
      throw error(errc::invalid_argument,
                  "inproc: wait() on the handle of a started collective that was already waited "
                  "for (or moved from)");
    finish();
  }

 private:
  friend class Communicator;
  struct State final : detail::Pending {
    State(Communicator c, std::string_view o, void* r, DType t, std::vector<std::size_t> sc,
          std::vector<std::size_t> rc)
        : comm(std::move(c)),
          op(o),
          recv(r),
          dtype(t),
          send_counts(std::move(sc)),
          recv_counts(std::move(rc)),
          uncaught(std::uncaught_exceptions()) {}
    /// Pulls this rank's blocks as soon as the rendezvous is complete (`wait()` or any wait
    /// of this rank in another collective).
    void progress() override {
      if (pulled || !comm.group_->all_arrived(epoch)) return;
      pulled = true;
      failed = comm.run_and_release(epoch, [&] { comm.pull_blocks(recv, recv_counts, dtype, op); });
    }
    Communicator comm;
    std::string_view op;
    std::uint64_t epoch = 0;
    void* recv = nullptr;
    DType dtype = DType::u8;
    std::vector<std::size_t> send_counts, recv_counts;  // the posted slot points at send_counts
    int uncaught = 0;
    bool pulled = false;
    std::exception_ptr failed;  // of the pull
  };
  explicit Started(std::unique_ptr<State> s) : s_(std::move(s)) {}
  void finish() {
    std::unique_ptr<State> const s = std::move(s_);
    Communicator& c = s->comm;
    c.group_->world().remove_pending(c.world_rank(), s.get());
    c.group_->set_started(c.rank_, {});
    if (!s->pulled) {
      c.group_->await_all(c.rank_, s->epoch, s->op, *c.name_);
      s->progress();
    }
    c.leave(s->epoch, s->op, s->failed);
  }
  std::unique_ptr<State> s_;
};

inline Communicator::Started Communicator::raw_start_all_to_all_v(
    void const* send, std::vector<std::size_t> send_counts, void* recv,
    std::vector<std::size_t> recv_counts, DType t) {
  auto s = std::make_unique<Started::State>(*this, "all_to_all_v", recv, t, std::move(send_counts),
                                            std::move(recv_counts));
  s->epoch =
      arrive({.op = "all_to_all_v", .dtype = t, .send = send, .counts = s->send_counts.data()});
  group_->set_started(rank_, "all_to_all_v");
  group_->world().add_pending(world_rank(), s.get());
  return Started(std::move(s));
}

static_assert(::moefold::Communicator<Communicator>);

}  // namespace inproc
}  // namespace v0
}  // namespace moefold
