#pragma once
/// \file
/// `inproc::Communicator`: a group of rank threads of one process (the embedded backend).
/// Copies between ranks are real; reductions run in rank order, so results are bitwise
/// reproducible run to run; a failing or missing rank makes every other rank fail fast.

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/comm/detail/reduce.hpp"
#include "moefold/comm/inproc/detail/world.hpp"

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

  void raw_barrier() { meet({.op = "barrier"}, [] {}); }

  void raw_all_reduce(void* data, std::size_t n, DType t, ReduceOp op) {
    std::vector<std::byte> result(n * size_of(t));
    meet({.op = "all_reduce", .dtype = t, .count = n, .root = static_cast<int>(op), .send = data},
         [&] {
           check_same_count_and_root("all_reduce");
           ::moefold::detail::reduce_ordered(t, op, inputs(), 0, n, result.data());
         });
    if (!result.empty()) std::memcpy(data, result.data(), result.size());
  }

  void raw_broadcast(void* data, std::size_t n, DType t, int root) {
    meet({.op = "broadcast", .dtype = t, .count = n, .root = root, .send = data}, [&] {
      check_same_count_and_root("broadcast");
      if (rank_ != root && n != 0) std::memcpy(data, group_->slot(root).send, n * size_of(t));
    });
  }

  void raw_all_gather_v(void const* send, void* recv, std::span<std::size_t const> counts,
                        DType t) {
    meet({.op = "all_gather_v", .dtype = t, .send = send, .counts = counts.data()}, [&] {
      check_same_counts("all_gather_v", counts);
      auto* out = static_cast<std::byte*>(recv);
      for (int p = 0; p < size(); ++p) {
        std::size_t const bytes = counts[idx(p)] * size_of(t);
        if (bytes != 0) std::memcpy(out, group_->slot(p).send, bytes);
        out += bytes;
      }
    });
  }

  void raw_reduce_scatter_v(void const* send, void* recv, std::span<std::size_t const> counts,
                            DType t, ReduceOp op) {
    meet({.op = "reduce_scatter_v", .dtype = t, .root = static_cast<int>(op), .send = send,
          .counts = counts.data()},
         [&] {
           check_same_counts("reduce_scatter_v", counts);
           std::size_t const offset =
               std::accumulate(counts.begin(), counts.begin() + rank_, std::size_t{0});
           ::moefold::detail::reduce_ordered(t, op, inputs(), offset, counts[idx(rank_)], recv);
         });
  }

  void raw_all_to_all_v(void const* send, std::span<std::size_t const> send_counts, void* recv,
                        std::span<std::size_t const> recv_counts, DType t) {
    meet({.op = "all_to_all_v", .dtype = t, .send = send, .counts = send_counts.data()}, [&] {
      check_same_signature();
      auto* out = static_cast<std::byte*>(recv);
      for (int q = 0; q < size(); ++q) {
        detail::Slot const& peer = group_->slot(q);
        std::size_t const sent_to_me = peer.counts[idx(rank_)];
        if (sent_to_me != recv_counts[idx(q)]) {
          fail(errc::invalid_argument,
               fmt::format("inproc: all_to_all_v on {}: world rank {} sends {} elements to world "
                           "rank {}, which expects {} from it",
                           group_->describe(*name_), group_->world_rank(q), sent_to_me,
                           world_rank(), recv_counts[idx(q)]));
        }
        std::size_t const offset =
            std::accumulate(peer.counts, peer.counts + rank_, std::size_t{0}) * size_of(t);
        std::size_t const bytes = sent_to_me * size_of(t);
        if (bytes != 0) std::memcpy(out, static_cast<std::byte const*>(peer.send) + offset, bytes);
        out += bytes;
      }
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
    require_valid("split");
    Communicator out;
    group_->arrive(rank_, {.op = "split", .label = *name_, .root = color, .key = key});
    {
      check_same_signature();
      // My new group: the ranks with my colour, ordered by (key, old rank).
      std::vector<int> mine;
      for (int q = 0; q < size(); ++q)
        if (color != kUndefinedColor && group_->slot(q).root == color) mine.push_back(q);
      std::stable_sort(mine.begin(), mine.end(),
                       [&](int a, int b) { return group_->slot(a).key < group_->slot(b).key; });
      if (!mine.empty() && mine.front() == rank_) {
        std::vector<int> world_ranks;
        for (int q : mine) world_ranks.push_back(group_->world_rank(q));
        group_->publish_group(rank_, group_->make_subgroup(std::move(world_ranks)));
      }
      group_->depart(rank_, "split", *name_);  // the leaders have published
      if (!mine.empty()) {
        auto const pos = std::find(mine.begin(), mine.end(), rank_) - mine.begin();
        out = Communicator(group_->slot(mine.front()).new_group, static_cast<int>(pos));
      }
    }
    group_->depart(rank_, "split", *name_);  // everyone has taken its group
    return out;
  }

 private:
  static std::size_t idx(int r) noexcept { return static_cast<std::size_t>(r); }

  void require_valid(std::string_view what) const {
    if (!group_) throw error(errc::invalid_argument, fmt::format("{} on a null communicator", what));
  }

  /// Runs one collective: post `slot`, wait for all, run `work` (reading peers' slots), wait
  /// for all again — also when `work` fails, so no buffer is freed while a peer reads it.
  template <class Work>
  void meet(detail::Slot slot, Work&& work) {
    require_valid(slot.op);
    std::string_view const op = slot.op;
    slot.label = *name_;
    group_->arrive(rank_, slot);
    try {
      work();
    } catch (...) {
      // This rank's buffers must outlive the peers' reads: depart before leaving, then report
      // this rank's own error rather than the abort it caused.
      try {
        group_->depart(rank_, op, *name_);
      } catch (error const&) {
      }
      throw;
    }
    group_->depart(rank_, op, *name_);
  }

  /// The posted send buffers in rank order.
  std::vector<void const*> inputs() const {
    std::vector<void const*> in(idx(size()));
    for (int q = 0; q < size(); ++q) in[idx(q)] = group_->slot(q).send;
    return in;
  }

  [[noreturn]] void fail(errc category, std::string const& msg) {
    group_->world().abort(world_rank(), msg);
    throw error(category, msg);
  }

  /// Every rank called the same collective with the same element type.
  void check_same_signature() {
    detail::Slot const& mine = group_->slot(rank_);
    for (int q = 0; q < size(); ++q) {
      detail::Slot const& s = group_->slot(q);
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
    detail::Slot const& mine = group_->slot(rank_);
    for (int q = 0; q < size(); ++q) {
      detail::Slot const& s = group_->slot(q);
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
      detail::Slot const& s = group_->slot(q);
      if (!std::equal(counts.begin(), counts.end(), s.counts) ||
          (op == "reduce_scatter_v" && s.root != group_->slot(rank_).root)) {
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

static_assert(::moefold::Communicator<Communicator>);

}  // namespace inproc
}  // namespace v0
}  // namespace moefold
