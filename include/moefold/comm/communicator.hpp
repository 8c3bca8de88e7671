#pragma once
/// \file
/// The `Communicator` concept and `CollectiveApi`, the typed front every backend shares.
///
/// A backend (inproc, mpi, nccl) implements a small type-erased interface (`raw_*` members on
/// byte buffers with a `DType` tag); `CollectiveApi<Backend>` adds the typed collectives, checks
/// their arguments with messages that name the call and the numbers, and counts traffic. Every
/// collective is **collective over the group: every rank of the group must call it**, in the
/// same order, with matching arguments.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/traffic.hpp"
#include "moefold/core/dtype.hpp"
#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// Reduction operators of all_reduce and reduce_scatter.
enum class ReduceOp : std::uint8_t { sum, max, min };

constexpr std::string_view name(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::sum: return "sum";
    case ReduceOp::max: return "max";
    case ReduceOp::min: return "min";
  }
  return "?";
}

/// The colour that leaves a rank out of every group of a split (like MPI_UNDEFINED): the rank
/// gets a null communicator (`valid() == false`).
inline constexpr int kUndefinedColor = -1;

/// One operation of a batched point-to-point exchange (`exchange`).
struct P2POp {
  enum class Kind : std::uint8_t { send, recv };
  Kind kind = Kind::send;
  int peer = 0;  ///< rank of the peer within the communicator
  int tag = 0;   ///< matches a send to a receive together with the peer
  void* data = nullptr;
  std::size_t count = 0;
  DType dtype = DType::u8;

  /// Sends `data` to `peer`; the buffer must stay alive until `exchange` returns.
  template <CommScalar T>
  static P2POp send(std::span<T const> data, int peer, int tag = 0) noexcept {
    return {Kind::send, peer, tag, const_cast<T*>(data.data()), data.size(), dtype_of<T>()};
  }
  /// Receives exactly `data.size()` elements from `peer` into `data`.
  template <CommScalar T>
  static P2POp recv(std::span<T> data, int peer, int tag = 0) noexcept {
    return {Kind::recv, peer, tag, data.data(), data.size(), dtype_of<T>()};
  }
  std::size_t bytes() const noexcept { return count * size_of(dtype); }
};

/// True for a backend whose ranks can read their peers' buffers in place (the in-process
/// world): its `exchange_view` copies nothing. Such a backend declares
/// `static constexpr bool peer_reads = true` and `raw_exchange_view`.
template <class Backend>
inline constexpr bool has_peer_reads_v = requires {
  requires Backend::peer_reads;
};

/// The handle `start_all_to_all_v` returns on a backend without non-blocking collectives: the
/// exchange ran at the start, `wait()` has nothing left to do.
struct [[nodiscard]] CompletedCollective {
  void wait() noexcept {}
};

/// The typed collectives of a communicator, written once for every backend (CRTP). `Backend`
/// provides `rank()`, `size()`, `raw_barrier()`, `raw_all_reduce`, `raw_broadcast`,
/// `raw_all_gather_v`, `raw_reduce_scatter_v`, `raw_all_to_all_v`, `raw_exchange`,
/// `raw_split` and `traffic_counters()`; optionally `raw_start_all_to_all_v` (a non-blocking
/// all-to-all returning a handle with `wait()`) and peer reads (`has_peer_reads_v`).
template <class Backend>
class CollectiveApi {
 public:
  /// Blocks until every rank of the group has called it.
  /// Collective over the group: every rank must call it.
  void barrier() {
    require_valid("barrier");
    self().raw_barrier();
    self().traffic_counters().add(CollectiveKind::barrier, 0, 0);
  }

  /// Element-wise reduction of `data` over the group, result in `data` on every rank. Sums run
  /// in rank order (bitwise reproducible where the backend allows; inproc always).
  /// Collective over the group: every rank must call it with the same count.
  template <CommScalar T>
  void all_reduce(std::span<T> data, ReduceOp op = ReduceOp::sum) {
    require_valid("all_reduce");
    self().raw_all_reduce(data.data(), data.size(), dtype_of<T>(), op);
    auto const b = others() * data.size_bytes();
    self().traffic_counters().add(CollectiveKind::all_reduce, b, b);
  }

  /// Copies `data` of rank `root` into `data` on every rank.
  /// Collective over the group: every rank must call it with the same root and count.
  template <CommScalar T>
  void broadcast(std::span<T> data, int root) {
    require_valid("broadcast");
    check_peer(root, "broadcast root");
    self().raw_broadcast(data.data(), data.size(), dtype_of<T>(), root);
    bool const is_root = root == rank();
    self().traffic_counters().add(CollectiveKind::broadcast,
                                  is_root ? others() * data.size_bytes() : 0,
                                  is_root ? 0 : data.size_bytes());
  }

  /// Concatenates every rank's `send` (equal sizes) into `recv` in rank order:
  /// `recv.size() == size() * send.size()`.
  /// Collective over the group: every rank must call it with the same count.
  template <CommScalar T>
  void all_gather(std::span<T const> send, std::span<T> recv) {
    std::vector<std::int64_t> counts(static_cast<std::size_t>(size()),
                                     static_cast<std::int64_t>(send.size()));
    all_gather_v<T>(send, recv, counts);
  }

  /// Concatenates every rank's `send` into `recv` in rank order; rank p contributes
  /// `counts[p]` elements (`counts[rank()] == send.size()`, `Σ counts == recv.size()`).
  /// Collective over the group: every rank must call it with the same counts.
  template <CommScalar T>
  void all_gather_v(std::span<T const> send, std::span<T> recv,
                    std::span<std::int64_t const> counts) {
    require_valid("all_gather_v");
    auto const c = checked_counts(counts, "all_gather_v", "counts");
    expect_size(c[my()], send.size(), "all_gather_v", "counts[rank] (this rank's send size)");
    expect_size(sum(c), recv.size(), "all_gather_v", "the sum of counts (recv size)");
    self().raw_all_gather_v(send.data(), recv.data(), c, dtype_of<T>());
    std::size_t const e = sizeof(T);
    self().traffic_counters().add(CollectiveKind::all_gather, others() * send.size() * e,
                                  (sum(c) - c[my()]) * e);
  }

  /// Reduces every rank's `send` (size() equal blocks) and gives rank p block p:
  /// `send.size() == size() * recv.size()`. Sums run in rank order.
  /// Collective over the group: every rank must call it with the same count.
  template <CommScalar T>
  void reduce_scatter(std::span<T const> send, std::span<T> recv, ReduceOp op = ReduceOp::sum) {
    std::vector<std::int64_t> counts(static_cast<std::size_t>(size()),
                                     static_cast<std::int64_t>(recv.size()));
    reduce_scatter_v<T>(send, recv, counts, op);
  }

  /// Reduces every rank's `send` element-wise and gives rank p the p-th segment, of
  /// `counts[p]` elements (`Σ counts == send.size()`, `counts[rank()] == recv.size()`).
  /// Collective over the group: every rank must call it with the same counts.
  template <CommScalar T>
  void reduce_scatter_v(std::span<T const> send, std::span<T> recv,
                        std::span<std::int64_t const> counts, ReduceOp op = ReduceOp::sum) {
    require_valid("reduce_scatter_v");
    auto const c = checked_counts(counts, "reduce_scatter_v", "counts");
    expect_size(sum(c), send.size(), "reduce_scatter_v", "the sum of counts (send size)");
    expect_size(c[my()], recv.size(), "reduce_scatter_v", "counts[rank] (this rank's recv size)");
    self().raw_reduce_scatter_v(send.data(), recv.data(), c, dtype_of<T>(), op);
    std::size_t const e = sizeof(T);
    self().traffic_counters().add(CollectiveKind::reduce_scatter, (sum(c) - c[my()]) * e,
                                  others() * c[my()] * e);
  }

  /// Personalized exchange: this rank sends `send_counts[p]` consecutive elements of `send` to
  /// rank p (in rank order) and receives `recv_counts[p]` elements from rank p into `recv` (in
  /// rank order). Rank q's `send_counts[p]` must equal rank p's `recv_counts[q]`.
  /// Collective over the group: every rank must call it.
  template <CommScalar T>
  void all_to_all_v(std::span<T const> send, std::span<std::int64_t const> send_counts,
                    std::span<T> recv, std::span<std::int64_t const> recv_counts) {
    require_valid("all_to_all_v");
    auto const sc = checked_counts(send_counts, "all_to_all_v", "send_counts");
    auto const rc = checked_counts(recv_counts, "all_to_all_v", "recv_counts");
    expect_size(sum(sc), send.size(), "all_to_all_v", "the sum of send_counts (send size)");
    expect_size(sum(rc), recv.size(), "all_to_all_v", "the sum of recv_counts (recv size)");
    self().raw_all_to_all_v(send.data(), sc, recv.data(), rc, dtype_of<T>());
    std::size_t const e = sizeof(T);
    self().traffic_counters().add(CollectiveKind::all_to_all, (sum(sc) - sc[my()]) * e,
                                  (sum(rc) - rc[my()]) * e);
  }

  /// Starts `all_to_all_v` (same arguments, checks and messages) and returns its handle at once;
  /// `handle.wait()` completes it, and errors (a failed or missing peer, a timeout, mismatched
  /// counts) come out of `wait()`. Between the two the rank may compute, and call collectives
  /// on *other* groups, but must not touch `send` or `recv` nor start another collective on
  /// this group. A handle dropped without `wait()` fails clearly (inproc: the world aborts
  /// naming the rank; MPI: the job aborts) — except while an exception unwinds the stack.
  /// Backends without a non-blocking form (`raw_start_all_to_all_v`) run the exchange here and
  /// return a handle whose `wait()` does nothing. Traffic is counted at the start.
  /// Collective over the group: every rank must call it (or the blocking form).
  template <CommScalar T>
  [[nodiscard]] auto start_all_to_all_v(std::span<T const> send,
                                        std::span<std::int64_t const> send_counts,
                                        std::span<T> recv,
                                        std::span<std::int64_t const> recv_counts) {
    if constexpr (requires { &Backend::raw_start_all_to_all_v; }) {
      require_valid("all_to_all_v");
      auto sc = checked_counts(send_counts, "all_to_all_v", "send_counts");
      auto rc = checked_counts(recv_counts, "all_to_all_v", "recv_counts");
      expect_size(sum(sc), send.size(), "all_to_all_v", "the sum of send_counts (send size)");
      expect_size(sum(rc), recv.size(), "all_to_all_v", "the sum of recv_counts (recv size)");
      std::size_t const e = sizeof(T);
      auto const sent = (sum(sc) - sc[my()]) * e, received = (sum(rc) - rc[my()]) * e;
      auto handle = self().raw_start_all_to_all_v(send.data(), std::move(sc), recv.data(),
                                                  std::move(rc), dtype_of<T>());
      self().traffic_counters().add(CollectiveKind::all_to_all, sent, received);
      return handle;
    } else {
      all_to_all_v<T>(send, send_counts, recv, recv_counts);
      return CompletedCollective{};
    }
  }

  /// Zero-copy receive side of a personalized exchange (the arguments of `all_to_all_v`
  /// without the receive buffer): calls `fn(blocks)` once, where `blocks[q]` is a
  /// `std::span<T const>` of the `recv_counts[q]` elements rank q sends to this rank. On a
  /// backend with peer reads (`has_peer_reads<Backend>`: the in-process world) the spans point
  /// into the peers' own send buffers, which stay alive and unchanged until every rank's `fn`
  /// has returned — `fn` may read them but not keep them. Other backends run `all_to_all_v`
  /// into a buffer of this call and pass spans into it. Errors as `all_to_all_v`; an exception
  /// of `fn` leaves through this call after the peers are done with this rank's buffer.
  /// Collective over the group: every rank must call it.
  template <CommScalar T, class Fn>
  void exchange_view(std::span<T const> send, std::span<std::int64_t const> send_counts,
                     std::span<std::int64_t const> recv_counts, Fn&& fn) {
    require_valid("exchange_view");
    auto const sc = checked_counts(send_counts, "exchange_view", "send_counts");
    auto const rc = checked_counts(recv_counts, "exchange_view", "recv_counts");
    expect_size(sum(sc), send.size(), "exchange_view", "the sum of send_counts (send size)");
    std::vector<std::span<T const>> blocks(rc.size());
    if constexpr (has_peer_reads_v<Backend>) {
      self().raw_exchange_view(send.data(), sc, rc, dtype_of<T>(),
                               [&](std::span<void const* const> starts) {
                                 for (std::size_t q = 0; q < rc.size(); ++q)
                                   blocks[q] = {static_cast<T const*>(starts[q]), rc[q]};
                                 fn(std::span<std::span<T const> const>(blocks));
                               });
      std::size_t const e = sizeof(T);
      self().traffic_counters().add(CollectiveKind::all_to_all, (sum(sc) - sc[my()]) * e,
                                    (sum(rc) - rc[my()]) * e);
    } else {
      std::vector<T> recv(sum(rc));
      all_to_all_v<T>(send, send_counts, std::span<T>(recv), recv_counts);
      std::size_t offset = 0;
      for (std::size_t q = 0; q < rc.size(); ++q) {
        blocks[q] = {recv.data() + offset, rc[q]};
        offset += rc[q];
      }
      fn(std::span<std::span<T const> const>(blocks));
    }
  }

  /// Sends `data` to `peer` (matched by a `recv` with this rank and tag on the peer).
  template <CommScalar T>
  void send(std::span<T const> data, int peer, int tag = 0) {
    P2POp const op = P2POp::send(data, peer, tag);
    exchange(std::span<P2POp const>(&op, 1));
  }
  /// Receives exactly `data.size()` elements from `peer`.
  template <CommScalar T>
  void recv(std::span<T> data, int peer, int tag = 0) {
    P2POp const op = P2POp::recv(data, peer, tag);
    exchange(std::span<P2POp const>(&op, 1));
  }
  /// Runs a batch of sends and receives as one group (like NCCL's grouped send/recv or
  /// `batch_isend_irecv`): all are posted before any is waited on, so a batch that sends to
  /// the next stage and receives from the previous one cannot deadlock. Returns when all are
  /// complete. Not collective: only the ranks named as peers take part.
  void exchange(std::span<P2POp const> ops) {
    require_valid("exchange");
    std::uint64_t sent = 0, received = 0;
    for (auto const& op : ops) {
      check_peer(op.peer, op.kind == P2POp::Kind::send ? "send peer" : "recv peer");
      MOEFOLD_EXPECTS(op.peer != rank(), "point-to-point with oneself (rank {}) is not supported",
                      rank());
      (op.kind == P2POp::Kind::send ? sent : received) += op.bytes();
    }
    self().raw_exchange(ops);
    self().traffic_counters().add(CollectiveKind::point_to_point, sent, received);
  }

  /// Splits the group: ranks that pass the same `color` (≥ 0) form a new communicator, ordered
  /// by (`key`, old rank); `kUndefinedColor` gives a null communicator.
  /// Collective over the group: every rank must call it.
  Backend split(int color, int key) {
    require_valid("split");
    MOEFOLD_EXPECTS(color >= 0 || color == kUndefinedColor,
                    "split colour must be ≥ 0 or kUndefinedColor (got {})", color);
    Backend out = self().raw_split(color, key);
    self().traffic_counters().add(CollectiveKind::split, 0, 0);
    return out;
  }

  /// This communicator's traffic counters on this rank.
  Traffic const& traffic() const { return self().traffic_counters(); }
  void reset_traffic() { self().traffic_counters().reset(); }

 private:
  Backend& self() { return static_cast<Backend&>(*this); }
  Backend const& self() const { return static_cast<Backend const&>(*this); }
  int rank() const { return self().rank(); }
  int size() const { return self().size(); }
  std::size_t my() const { return static_cast<std::size_t>(rank()); }
  std::size_t others() const { return static_cast<std::size_t>(size() - 1); }

  void require_valid(std::string_view call) const {
    if (!self().valid())
      throw error(errc::invalid_argument, fmt::format("{} on a null communicator", call));
  }
  void check_peer(int peer, std::string_view what) const {
    MOEFOLD_EXPECTS(peer >= 0 && peer < size(), "{} {} is outside the group of size {}", what, peer,
                    size());
  }
  std::vector<std::size_t> checked_counts(std::span<std::int64_t const> counts,
                                          std::string_view call, std::string_view what) const {
    MOEFOLD_EXPECTS(counts.size() == static_cast<std::size_t>(size()),
                    "{}: {} has {} entries but the group has {} ranks", call, what, counts.size(),
                    size());
    std::vector<std::size_t> out(counts.size());
    for (std::size_t p = 0; p < counts.size(); ++p) {
      MOEFOLD_EXPECTS(counts[p] >= 0, "{}: {}[{}] = {} is negative", call, what, p, counts[p]);
      out[p] = static_cast<std::size_t>(counts[p]);
    }
    return out;
  }
  static void expect_size(std::size_t expected, std::size_t actual, std::string_view call,
                          std::string_view what) {
    MOEFOLD_EXPECTS(expected == actual, "{}: {} is {} but the buffer holds {} elements", call, what,
                    expected, actual);
  }
  static std::size_t sum(std::vector<std::size_t> const& c) {
    return std::accumulate(c.begin(), c.end(), std::size_t{0});
  }
};

/// A communicator: a group of ranks with the typed collectives of `CollectiveApi`, including
/// the non-blocking `start_all_to_all_v(…).wait()` and `exchange_view`.
template <class C>
concept Communicator = std::copy_constructible<C> &&
    requires(C& c, C const& cc, std::span<float> f, std::span<float const> cf,
             std::span<std::int64_t const> counts, std::span<P2POp const> ops) {
  { cc.rank() } -> std::same_as<int>;
  { cc.size() } -> std::same_as<int>;
  { cc.valid() } -> std::same_as<bool>;
  c.barrier();
  c.all_reduce(f, ReduceOp::sum);
  c.broadcast(f, 0);
  c.all_gather(cf, f);
  c.all_gather_v(cf, f, counts);
  c.reduce_scatter(cf, f, ReduceOp::sum);
  c.reduce_scatter_v(cf, f, counts, ReduceOp::sum);
  c.all_to_all_v(cf, counts, f, counts);
  c.start_all_to_all_v(cf, counts, f, counts).wait();
  c.send(cf, 0, 0);
  c.recv(f, 0, 0);
  c.exchange(ops);
  { c.split(0, 0) } -> std::same_as<C>;
  { cc.traffic() } -> std::same_as<Traffic const&>;
};

}  // namespace v0
}  // namespace moefold
