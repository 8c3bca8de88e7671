#pragma once
/// \file
/// `moefold::mpi::Communicator`: a group of MPI processes with moefold's collectives
/// (component `moefold::mpi`; mpi.h stays out of public headers).
///
/// Every collective is issued non-blocking and completed against a deadline (`timeout()`), so a
/// peer that never arrives becomes a `moefold::error` with category `errc::timeout` naming the
/// collective, the group (its ranks in MPI_COMM_WORLD) and the timeout, instead of a hang. MPI
/// errors are returned, not fatal (MPI_ERRORS_RETURN), and thrown as `moefold::error` with
/// category `errc::communication` and MPI's message. After a timeout or an MPI error the
/// communicator is unusable (its collective may still be pending): later calls on it throw, and
/// the job should end, e.g. through `moefold::mpi::run`, which aborts it.
///
/// Counts are MPI `int`s: a single message holds at most 2^31 − 1 elements.

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/comm/traffic.hpp"
#include "moefold/core/dtype.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi {

/// A handle to an MPI communicator (an `MPI_Comm` with MPI_ERRORS_RETURN). Copies share the
/// communicator, its timeout and its traffic counters; the `MPI_Comm` is freed when the last copy
/// goes away (never after MPI_Finalize). A handle is not thread-safe: MPI runs at
/// MPI_THREAD_SERIALIZED, one thread at a time.
///
/// bf16 reductions are computed in float: each rank widens its bf16 values to float, MPI reduces
/// the floats, and the result is rounded to bf16 once (max and min are exact). Sums of float and
/// double follow MPI's reduction order, which is not necessarily rank order.
class Communicator : public CollectiveApi<Communicator> {
 public:
  /// The default timeout of every collective.
  static constexpr std::chrono::milliseconds kDefaultTimeout{120'000};

  /// A null communicator (`valid() == false`): what `split` gives a rank that passes
  /// `kUndefinedColor`.
  Communicator();

  /// A duplicate of MPI_COMM_WORLD, so that moefold's messages never match the program's own.
  /// Requires MPI to be initialized (`Environment`, or inside `moefold::mpi::run`).
  /// Collective over MPI_COMM_WORLD: every process must call it.
  static Communicator world();

  /// This process's rank in the group, or −1 for a null communicator.
  int rank() const;
  /// The number of ranks in the group, or 0 for a null communicator.
  int size() const;
  /// False for the null communicator that `split(kUndefinedColor, …)` returns.
  bool valid() const;
  /// The group's members as ranks of MPI_COMM_WORLD, in group rank order (empty when null).
  std::vector<int> const& world_ranks() const;

  /// How long a collective may take before it throws `errc::timeout` (default 120 s).
  std::chrono::milliseconds timeout() const;
  /// Sets the timeout of this communicator (shared by its copies; inherited by `split`).
  /// Precondition: `timeout > 0`.
  void set_timeout(std::chrono::milliseconds timeout);

  // ---- the backend interface of `CollectiveApi` (type-erased; use the typed collectives) ----

  /// Collective over the group: every rank must call it.
  void raw_barrier();
  /// In-place element-wise reduction of `count` elements at `data`.
  /// Collective over the group: every rank must call it with the same count.
  void raw_all_reduce(void* data, std::size_t count, DType dtype, ReduceOp op);
  /// Copies `count` elements at `data` of rank `root` into `data` on every rank.
  /// Collective over the group: every rank must call it with the same root and count.
  void raw_broadcast(void* data, std::size_t count, DType dtype, int root);
  /// Concatenates every rank's `counts[rank]` elements at `send` into `recv`, in rank order.
  /// Collective over the group: every rank must call it with the same counts.
  void raw_all_gather_v(void const* send, void* recv, std::span<std::size_t const> counts,
                        DType dtype);
  /// Reduces every rank's `send` and gives rank p segment p (`counts[p]` elements) in `recv`.
  /// Collective over the group: every rank must call it with the same counts.
  void raw_reduce_scatter_v(void const* send, void* recv, std::span<std::size_t const> counts,
                            DType dtype, ReduceOp op);
  /// Sends `send_counts[p]` elements to rank p and receives `recv_counts[p]` from it, both
  /// packed in rank order.
  /// Collective over the group: every rank must call it.
  void raw_all_to_all_v(void const* send, std::span<std::size_t const> send_counts, void* recv,
                        std::span<std::size_t const> recv_counts, DType dtype);
  /// Posts every send and receive of `ops`, then waits for all of them against the deadline.
  /// Not collective: only the peers named in `ops` take part.
  void raw_exchange(std::span<P2POp const> ops);
  /// `MPI_Comm_split` (with MPI_UNDEFINED for `kUndefinedColor`); the new communicator returns
  /// errors and inherits this one's timeout.
  /// Collective over the group: every rank must call it.
  Communicator raw_split(int color, int key);
  /// The traffic counters shared by every copy of this handle.
  Traffic& traffic_counters();
  Traffic const& traffic_counters() const;

 private:
  struct Impl;  // the MPI state (src/comm/mpi/communicator.cpp)
  explicit Communicator(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
