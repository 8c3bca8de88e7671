#include "moefold/comm/mpi/communicator.hpp"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <mutex>
#include <numeric>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/comm/mpi/environment.hpp"
#include "moefold/core/bf16.hpp"
#include "moefold/core/error.hpp"
#include "mpi_error.hpp"

namespace moefold {
inline namespace v0 {

static_assert(Communicator<mpi::Communicator>);

namespace mpi {
namespace {

using std::chrono::milliseconds;

// bf16 has no MPI type: it moves as MPI_UINT16_T and is reduced as float (see `widen`).
MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::bf16:
      return MPI_UINT16_T;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    case DType::u8:
      return MPI_UINT8_T;
  }
  throw error(errc::internal, fmt::format("no MPI type for dtype {}", static_cast<int>(t)));
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return MPI_SUM;
    case ReduceOp::max:
      return MPI_MAX;
    case ReduceOp::min:
      return MPI_MIN;
  }
  throw error(errc::internal, fmt::format("no MPI op for reduction {}", static_cast<int>(op)));
}

int to_int(std::size_t n, std::string_view call, std::string_view what) {
  if (n > static_cast<std::size_t>(INT_MAX))
    throw error(errc::invalid_argument,
                fmt::format("mpi {}: {} is {} elements, above MPI's count limit of {}", call, what,
                            n, INT_MAX));
  return static_cast<int>(n);
}

// Per-rank counts and displacements as MPI ints (the displacements must fit too).
struct IntLayout {
  std::vector<int> counts;
  std::vector<int> displs;
};

IntLayout int_layout(std::span<std::size_t const> counts, std::string_view call,
                     std::string_view what) {
  IntLayout out;
  out.counts.reserve(counts.size());
  out.displs.reserve(counts.size());
  std::size_t offset = 0;
  for (std::size_t c : counts) {
    out.displs.push_back(to_int(offset, call, fmt::format("the displacement in {}", what)));
    out.counts.push_back(to_int(c, call, what));
    offset += c;
  }
  to_int(offset, call, fmt::format("the sum of {}", what));
  return out;
}

// bf16 reductions run in float: widen, reduce with MPI_FLOAT, round once with `narrow`.
std::vector<float> widen(void const* data, std::size_t count) {
  auto const* in = static_cast<bf16 const*>(data);
  std::vector<float> out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
  return out;
}

void narrow(std::vector<float> const& values, void* data) {
  auto* out = static_cast<bf16*>(data);
  for (std::size_t i = 0; i < values.size(); ++i) out[i] = bf16(values[i]);
}

// The staging buffers of a collective that timed out: MPI may still write them when a late peer
// arrives, so they are kept (leaked) for the rest of the process.
void keep_forever(std::vector<std::vector<float>>& staging) {
  static std::mutex mutex;
  static auto* kept = new std::vector<std::vector<float>>();
  std::lock_guard const lock(mutex);
  for (auto& buffer : staging) kept->push_back(std::move(buffer));
}

std::string list_ranks(std::vector<int> const& ranks) {
  constexpr std::size_t kHead = 16, kTail = 4;
  if (ranks.size() <= kHead + kTail) return fmt::format("[{}]", fmt::join(ranks, ", "));
  return fmt::format("[{}, …, {}] ({} ranks)",
                     fmt::join(ranks.begin(), ranks.begin() + kHead, ", "),
                     fmt::join(ranks.end() - kTail, ranks.end(), ", "), ranks.size());
}

}  // namespace

// ---- Impl ----------------------------------------------------------------------------------

struct Communicator::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  bool owned = false;  // freed by the destructor
  int rank = -1;
  int size = 0;
  std::vector<int> world_ranks;
  milliseconds timeout = kDefaultTimeout;
  Traffic traffic;
  std::string broken;  // why the communicator is unusable; empty while it is usable

  Impl() = default;  // a null communicator

  // Takes `c` (freeing it at the end when `own`), with errors returned, not fatal.
  Impl(MPI_Comm c, milliseconds t, bool own) : comm(c), owned(own), timeout(t) {
    if (owned)
      detail::check(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    detail::check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
    detail::check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
    MPI_Group group = MPI_GROUP_NULL, world_group = MPI_GROUP_NULL;
    detail::check(MPI_Comm_group(comm, &group), "MPI_Comm_group");
    detail::check(MPI_Comm_group(MPI_COMM_WORLD, &world_group), "MPI_Comm_group");
    std::vector<int> local(static_cast<std::size_t>(size));
    std::iota(local.begin(), local.end(), 0);
    world_ranks.resize(local.size());
    int const code =
        MPI_Group_translate_ranks(group, size, local.data(), world_group, world_ranks.data());
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
    detail::check(code, "MPI_Group_translate_ranks");
  }

  ~Impl() {
    if (!owned || comm == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm);
  }
  Impl(Impl const&) = delete;
  Impl& operator=(Impl const&) = delete;

  std::string group() const {
    return fmt::format("the group of world ranks {}", list_ranks(world_ranks));
  }

  // Throws unless collectives may run on this communicator.
  void expect_usable(std::string_view call) const {
    if (comm == MPI_COMM_NULL)
      throw error(errc::invalid_argument,
                  fmt::format("mpi {}: called on a null communicator (this rank passed "
                              "kUndefinedColor to split)",
                              call));
    if (!broken.empty())
      throw error(errc::communication,
                  fmt::format("mpi {} on {}: this communicator is unusable after an earlier "
                              "failure: {}",
                              call, group(), broken));
  }

  // An MPI error on this communicator: it becomes unusable, and the error names the call.
  [[noreturn]] void fail(int code, std::string_view call, std::string_view mpi_call) {
    broken = fmt::format("mpi {} on {} (rank {} of {}): {} failed: {} (MPI error {})", call,
                         group(), rank, size, mpi_call, detail::error_text(code), code);
    throw error(errc::communication, broken);
  }
  void post(int code, std::string_view call, std::string_view mpi_call) {
    if (code != MPI_SUCCESS) fail(code, call, mpi_call);
  }

  // Completes `requests` with MPI_Testall and growing sleeps (10 µs … 1 ms) until they are done
  // or the deadline passes; then the communicator is unusable and `errc::timeout` is thrown.
  // `staging` holds buffers MPI writes, kept alive forever after a timeout.
  void complete(std::span<MPI_Request> requests, std::string_view call,
                std::vector<std::vector<float>>* staging = nullptr) {
    using clock = std::chrono::steady_clock;
    auto const deadline = clock::now() + timeout;
    auto pause = std::chrono::microseconds(10);
    std::vector<MPI_Status> statuses(requests.size());
    int const n = static_cast<int>(requests.size());
    for (;;) {
      int done = 0;
      int const code = MPI_Testall(n, requests.data(), &done, statuses.data());
      if (code == MPI_ERR_IN_STATUS) {
        for (auto const& s : statuses)
          if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING)
            fail(s.MPI_ERROR, call, "MPI_Testall");
      }
      if (code != MPI_SUCCESS) fail(code, call, "MPI_Testall");
      if (done) return;
      if (clock::now() >= deadline) break;
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
    if (staging) keep_forever(*staging);
    broken = fmt::format(
        "mpi {} timed out after {} ms on {} (rank {} of {}): a peer never called it or is stuck; "
        "this communicator is now unusable",
        call, timeout.count(), group(), rank, size);
    throw error(errc::timeout, broken);
  }
  void complete(MPI_Request& request, std::string_view call,
                std::vector<std::vector<float>>* staging = nullptr) {
    complete(std::span<MPI_Request>(&request, 1), call, staging);
  }
};

// ---- Communicator --------------------------------------------------------------------------

Communicator::Communicator() : impl_(std::make_shared<Impl>()) {}
Communicator::Communicator(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Communicator Communicator::world() {
  if (!Environment::active())
    throw error(errc::unavailable,
                "mpi world: MPI is not initialized (create a moefold::mpi::Environment first, "
                "or run inside moefold::mpi::run)");
  Impl world_view(MPI_COMM_WORLD, kDefaultTimeout, /*own=*/false);
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request request = MPI_REQUEST_NULL;
  world_view.post(MPI_Comm_idup(MPI_COMM_WORLD, &dup, &request), "world", "MPI_Comm_idup");
  world_view.complete(request, "world (duplicating MPI_COMM_WORLD)");
  return Communicator(std::make_shared<Impl>(dup, kDefaultTimeout, /*own=*/true));
}

int Communicator::rank() const { return impl_->rank; }
int Communicator::size() const { return impl_->size; }
bool Communicator::valid() const { return impl_->comm != MPI_COMM_NULL; }
std::vector<int> const& Communicator::world_ranks() const { return impl_->world_ranks; }
std::chrono::milliseconds Communicator::timeout() const { return impl_->timeout; }

void Communicator::set_timeout(std::chrono::milliseconds timeout) {
  MOEFOLD_EXPECTS(timeout.count() > 0, "mpi set_timeout: the timeout must be positive (got {} ms)",
                  timeout.count());
  impl_->timeout = timeout;
}

Traffic& Communicator::traffic_counters() { return impl_->traffic; }
Traffic const& Communicator::traffic_counters() const { return impl_->traffic; }

void Communicator::raw_barrier() {
  Impl& m = *impl_;
  m.expect_usable("barrier");
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibarrier(m.comm, &request), "barrier", "MPI_Ibarrier");
  m.complete(request, "barrier");
}

void Communicator::raw_all_reduce(void* data, std::size_t count, DType dtype, ReduceOp op) {
  Impl& m = *impl_;
  constexpr std::string_view call = "all_reduce";
  m.expect_usable(call);
  int const n = to_int(count, call, "count");
  MPI_Request request = MPI_REQUEST_NULL;
  if (dtype == DType::bf16) {
    std::vector<std::vector<float>> staging{widen(data, count)};
    m.post(
        MPI_Iallreduce(MPI_IN_PLACE, staging[0].data(), n, MPI_FLOAT, mpi_op(op), m.comm, &request),
        call, "MPI_Iallreduce");
    m.complete(request, call, &staging);
    narrow(staging[0], data);
    return;
  }
  m.post(MPI_Iallreduce(MPI_IN_PLACE, data, n, mpi_type(dtype), mpi_op(op), m.comm, &request), call,
         "MPI_Iallreduce");
  m.complete(request, call);
}

void Communicator::raw_broadcast(void* data, std::size_t count, DType dtype, int root) {
  Impl& m = *impl_;
  constexpr std::string_view call = "broadcast";
  m.expect_usable(call);
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibcast(data, to_int(count, call, "count"), mpi_type(dtype), root, m.comm, &request),
         call, "MPI_Ibcast");
  m.complete(request, call);
}

void Communicator::raw_all_gather_v(void const* send, void* recv,
                                    std::span<std::size_t const> counts, DType dtype) {
  Impl& m = *impl_;
  constexpr std::string_view call = "all_gather_v";
  m.expect_usable(call);
  IntLayout const l = int_layout(counts, call, "counts");
  MPI_Datatype const type = mpi_type(dtype);
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Iallgatherv(send, l.counts[static_cast<std::size_t>(m.rank)], type, recv,
                         l.counts.data(), l.displs.data(), type, m.comm, &request),
         call, "MPI_Iallgatherv");
  m.complete(request, call);
}

void Communicator::raw_reduce_scatter_v(void const* send, void* recv,
                                        std::span<std::size_t const> counts, DType dtype,
                                        ReduceOp op) {
  Impl& m = *impl_;
  constexpr std::string_view call = "reduce_scatter_v";
  m.expect_usable(call);
  IntLayout const l = int_layout(counts, call, "counts");
  MPI_Request request = MPI_REQUEST_NULL;
  if (dtype == DType::bf16) {
    std::size_t const total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
    std::vector<std::vector<float>> staging{widen(send, total),
                                            std::vector<float>(counts[std::size_t(m.rank)])};
    m.post(MPI_Ireduce_scatter(staging[0].data(), staging[1].data(), l.counts.data(), MPI_FLOAT,
                               mpi_op(op), m.comm, &request),
           call, "MPI_Ireduce_scatter");
    m.complete(request, call, &staging);
    narrow(staging[1], recv);
    return;
  }
  m.post(MPI_Ireduce_scatter(send, recv, l.counts.data(), mpi_type(dtype), mpi_op(op), m.comm,
                             &request),
         call, "MPI_Ireduce_scatter");
  m.complete(request, call);
}

void Communicator::raw_all_to_all_v(void const* send, std::span<std::size_t const> send_counts,
                                    void* recv, std::span<std::size_t const> recv_counts,
                                    DType dtype) {
  Impl& m = *impl_;
  constexpr std::string_view call = "all_to_all_v";
  m.expect_usable(call);
  IntLayout const s = int_layout(send_counts, call, "send_counts");
  IntLayout const r = int_layout(recv_counts, call, "recv_counts");
  MPI_Datatype const type = mpi_type(dtype);
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ialltoallv(send, s.counts.data(), s.displs.data(), type, recv, r.counts.data(),
                        r.displs.data(), type, m.comm, &request),
         call, "MPI_Ialltoallv");
  m.complete(request, call);
}

void Communicator::raw_exchange(std::span<P2POp const> ops) {
  Impl& m = *impl_;
  m.expect_usable("exchange");
  std::vector<int> to, from;
  for (auto const& op : ops) (op.kind == P2POp::Kind::send ? to : from).push_back(op.peer);
  std::string const call = fmt::format("exchange (sends to ranks {}, receives from ranks {})",
                                       list_ranks(to), list_ranks(from));
  std::vector<MPI_Request> requests(ops.size(), MPI_REQUEST_NULL);
  for (std::size_t i = 0; i < ops.size(); ++i) {
    P2POp const& op = ops[i];
    int const n = to_int(op.count, call, "a message");
    if (op.kind == P2POp::Kind::send)
      m.post(MPI_Isend(op.data, n, mpi_type(op.dtype), op.peer, op.tag, m.comm, &requests[i]), call,
             "MPI_Isend");
    else
      m.post(MPI_Irecv(op.data, n, mpi_type(op.dtype), op.peer, op.tag, m.comm, &requests[i]), call,
             "MPI_Irecv");
  }
  m.complete(requests, call);
}

Communicator Communicator::raw_split(int color, int key) {
  Impl& m = *impl_;
  m.expect_usable("split");
  // MPI_Comm_split blocks: a barrier against the deadline first turns a missing peer into a
  // timeout instead of a hang.
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibarrier(m.comm, &request), "split", "MPI_Ibarrier");
  m.complete(request, "split");
  MPI_Comm out = MPI_COMM_NULL;
  m.post(MPI_Comm_split(m.comm, color == kUndefinedColor ? MPI_UNDEFINED : color, key, &out),
         "split", "MPI_Comm_split");
  if (out == MPI_COMM_NULL) return Communicator();
  return Communicator(std::make_shared<Impl>(out, m.timeout, /*own=*/true));
}

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
