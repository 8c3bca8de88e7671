#pragma once
/// \file
/// `moefold::mpi::Communicator`: a group of MPI processes with moefold's collectives
/// (component `moefold::mpi`; mpi.h stays out of public headers).
///
/// Every collective is issued non-blocking and completed against a deadline (`timeout()`), so a
/// peer that never arrives becomes a `moefold::error` with category `errc::timeout` instead of a
/// hang. The message names the collective, the group (its name and its ranks in
/// MPI_COMM_WORLD), the timeout, the ranks that arrived and the ranks that did not, e.g.
/// "mpi: collective all_to_all_v over group ep (world ranks 0 1 2 3) timed out after 600 s:
/// ranks 0 1 3 arrived, rank 2 did not". Who arrived is learnt over a side channel, a duplicate
/// of the communicator made at construction: a rank whose collective times out sends its
/// position (the collective's sequence number and name) to every peer, and a rank still waiting
/// in a collective of the same communicator answers with its own. Peers silent there are asked
/// over the world communicator's side channel where they wait (another group's collective, or
/// the end of `moefold::mpi::run`); a rank that answers nothing is stopped, busy or gone. The
/// side channels carry nothing while collectives complete in time. MPI errors are returned,
/// not fatal (MPI_ERRORS_RETURN), and thrown as `moefold::error` with category
/// `errc::communication` and MPI's message (in a collective, with who arrived, as above). After
/// a timeout or an MPI error the communicator is unusable (its collective may still be
/// pending): later calls on it throw, and the job should end, e.g. through `moefold::mpi::run`,
/// which aborts it.
///
/// Counts are MPI `int`s: a single message holds at most 2^31 − 1 elements.

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "moefold/comm/communicator.hpp"
#include "moefold/comm/traffic.hpp"
#include "moefold/core/dtype.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi {

/// Settings of the MPI communicators a program starts from (`Communicator::world`,
/// `moefold::mpi::run`).
struct Options {
  /// How long a collective may take before it throws `errc::timeout`; the default is Megatron's
  /// `--distributed-timeout-minutes` default, 10 minutes. Must be positive.
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
};

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
  /// The default timeout of every collective (10 minutes, `Options{}.timeout`).
  static constexpr std::chrono::milliseconds kDefaultTimeout{std::chrono::minutes(10)};

  /// A null communicator (`valid() == false`): what `split` gives a rank that passes
  /// `kUndefinedColor`.
  Communicator();

  /// A duplicate of MPI_COMM_WORLD, so that moefold's messages never match the program's own,
  /// with `options.timeout` (its splits inherit it). Requires MPI to be initialized
  /// (`Environment`, or inside `moefold::mpi::run`). Throws `errc::invalid_argument` for a
  /// timeout that is not positive.
  /// Collective over MPI_COMM_WORLD: every process must call it.
  static Communicator world(Options const& options = {});

  /// This process's rank in the group, or −1 for a null communicator.
  int rank() const;
  /// The number of ranks in the group, or 0 for a null communicator.
  int size() const;
  /// False for the null communicator that `split(kUndefinedColor, …)` returns.
  bool valid() const;
  /// The group's members as ranks of MPI_COMM_WORLD, in group rank order (empty when null).
  std::vector<int> const& world_ranks() const;

  /// The name of the group in error messages ("ep", "tp", …; `ProcessGroups` names the groups
  /// it makes); empty by default and for the result of `split`.
  std::string const& group_name() const;
  /// Names the group for error messages (shared by this handle's copies). Not collective.
  void set_group_name(std::string name);

  /// How long a collective may take before it throws `errc::timeout` (default 10 minutes).
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
  class Started;
  /// Posts `MPI_Ialltoallv` and returns its handle (`CollectiveApi::start_all_to_all_v`);
  /// `Started::wait()` completes it against the deadline, with the errors of the blocking form.
  /// Collective over the group: every rank must call it (or the blocking form).
  Started raw_start_all_to_all_v(void const* send, std::vector<std::size_t> send_counts,
                                 void* recv, std::vector<std::size_t> recv_counts, DType dtype);
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
  // `run` ends with `finish`, a barrier over the world that peers report as "returned from the
  // function given to moefold::mpi::run" when it is where a rank waits.
  friend int run(int* argc, char*** argv, std::function<void(Communicator&)> const& fn,
                 Options const& options);
  void finish();

  struct Impl;  // the MPI state (src/comm/mpi/communicator.cpp)
  explicit Communicator(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

/// The handle of a started all_to_all_v: `wait()` completes it (once). Until then the rank must
/// not touch the send and receive buffers nor start another collective on the communicator.
/// A handle dropped without `wait()` aborts the job with a message naming the rank and the
/// collective on stderr — except while an exception unwinds the stack, when it completes the
/// collective quietly (or gives up at the timeout).
class [[nodiscard]] Communicator::Started {
 public:
  Started(Started&&) noexcept;
  Started& operator=(Started&&) = delete;
  Started(Started const&) = delete;
  Started& operator=(Started const&) = delete;
  ~Started();
  /// Completes the collective against the deadline; throws as the blocking form does.
  void wait();

 private:
  friend class Communicator;
  struct State;  // src/comm/mpi/communicator.cpp
  explicit Started(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
