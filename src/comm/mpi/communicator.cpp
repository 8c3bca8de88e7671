#include "moefold/comm/mpi/communicator.hpp"

#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "moefold/comm/detail/fault_message.hpp"
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

// ---- the side channel: who arrived at a collective that timed out --------------------------
//
// Each owned communicator has a duplicate, `side`. A rank whose collective times out sends a
// Position (the collective's sequence number on the communicator and which collective it is)
// to every peer over `side`; a rank waiting in a collective of the communicator serves `side`
// while it polls, recording the positions it hears and answering each peer once per collective
// with its own. So after a short grace period the rank that timed out knows every peer still
// polling this communicator; the silent ones are stopped, gone or stuck elsewhere. Positions
// travel only on that failure path: a healthy step sends nothing on `side`.

// The collectives, by the code a Position carries; `finish` is the final barrier of `run`.
constexpr std::array<std::string_view, 8> kCollectives = {
    "barrier",          "all_reduce",   "broadcast", "all_gather_v",
    "reduce_scatter_v", "all_to_all_v", "split",     "finish"};
constexpr int kFinish = 7;
constexpr int kPositionTag = 1;  // a Position, on a communicator's side channel
constexpr int kInquiryTag = 2;   // "where do you wait?", on the world's side channel
constexpr int kWhereTag = 3;     // the answer, a text, on the world's side channel

std::int64_t collective_code(std::string_view call) {
  for (std::size_t i = 0; i < kCollectives.size(); ++i)
    if (kCollectives[i] == call) return static_cast<std::int64_t>(i);
  throw error(errc::internal, fmt::format("mpi: no side-channel code for collective {}", call));
}

// What a peer told about where it waits: its collective's sequence number and code.
using Position = std::array<std::int64_t, 2>;

// A Position in flight: MPI reads it until the (freed) send completes, maybe never when the
// peer is gone, so it lives for the rest of the process. Only failures send positions.
Position const* keep_position(Position p) {
  static std::mutex mutex;
  static auto* kept = new std::deque<Position>();
  std::lock_guard const lock(mutex);
  kept->push_back(p);
  return &kept->back();
}

// An answer in flight (see keep_position).
std::string const& keep_text(std::string text) {
  static std::mutex mutex;
  static auto* kept = new std::deque<std::string>();
  std::lock_guard const lock(mutex);
  kept->push_back(std::move(text));
  return kept->back();
}

}  // namespace

// ---- Impl ----------------------------------------------------------------------------------

struct Communicator::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm side = MPI_COMM_NULL;  // duplicate of comm for positions (owned communicators)
  bool owned = false;             // freed by the destructor
  int rank = -1;
  int size = 0;
  std::vector<int> world_ranks;
  std::string name;  // the group's name in messages ("ep"), may be empty
  milliseconds timeout = kDefaultTimeout;
  Traffic traffic;
  std::string broken;  // why the communicator is unusable; empty while it is usable
  std::string_view started;  // a started collective not waited for yet (its name)
  // The collective in progress (or the last one): its sequence number on this communicator and
  // its code in kCollectives.
  Position position{0, -1};
  std::vector<Position> heard;     // per peer: its last position heard over `side`
  std::vector<std::int64_t> told;  // per peer: the sequence number we last told it about

  Impl() = default;  // a null communicator

  // Takes `c` (freeing it at the end when `own`), with errors returned, not fatal. An owned
  // communicator gets its side channel (`MPI_Comm_idup`, completed against the deadline: every
  // rank of `c` is here already, since it just took part in making `c`).
  Impl(MPI_Comm c, milliseconds t, bool own, std::string_view call)
      : comm(c), owned(own), timeout(t) {
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
    heard.assign(static_cast<std::size_t>(size), Position{-1, -1});
    told.assign(static_cast<std::size_t>(size), -1);
    if (owned) {
      // `side` stays null until the duplicate is complete: the wait does not serve it before.
      MPI_Comm dup = MPI_COMM_NULL;
      MPI_Request request = MPI_REQUEST_NULL;
      post(MPI_Comm_idup(comm, &dup, &request), call, "MPI_Comm_idup");
      complete(request, call);
      side = dup;
      detail::check(MPI_Comm_set_errhandler(side, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    }
  }

  ~Impl() {
    if (current == this) current = nullptr;
    if (world_impl == this) world_impl = nullptr;
    if (!owned || comm == MPI_COMM_NULL) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (side != MPI_COMM_NULL) MPI_Comm_free(&side);
    MPI_Comm_free(&comm);
  }
  Impl(Impl const&) = delete;
  Impl& operator=(Impl const&) = delete;

  std::string group() const { return moefold::detail::group_description(name, world_ranks); }

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

  // Starts collective `call`: it is usable, and the side channels tell peers that we are here.
  void begin(std::string_view call) {
    expect_usable(call);
    if (!started.empty())
      throw error(errc::invalid_argument,
                  fmt::format("mpi {} on {} while the {} this rank (world rank {}) started on the "
                              "communicator is not waited for: call wait() on its handle first",
                              call, group(), started, world_ranks[static_cast<std::size_t>(rank)]));
    position = {position[0] + 1, collective_code(call)};
    current = this;
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

  // ---- the side channel ----

  // Sends our position to `peer` once per collective. Failures to send are ignored: the side
  // channel only adds detail to an error that is being raised anyway.
  void tell(int peer) {
    auto const p = static_cast<std::size_t>(peer);
    if (side == MPI_COMM_NULL || told[p] == position[0]) return;
    told[p] = position[0];
    Position const* buffer = keep_position(position);
    MPI_Request request = MPI_REQUEST_NULL;
    if (MPI_Isend(buffer->data(), 2, MPI_INT64_T, peer, kPositionTag, side, &request) ==
        MPI_SUCCESS)
      MPI_Request_free(&request);
  }

  // Records every position that has come in, and answers each sender with ours.
  void serve() {
    if (side == MPI_COMM_NULL) return;
    for (;;) {
      int flag = 0;
      MPI_Status status;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kPositionTag, side, &flag, &status) != MPI_SUCCESS || !flag)
        return;
      Position p{-1, -1};
      int const peer = status.MPI_SOURCE;
      if (MPI_Recv(p.data(), 2, MPI_INT64_T, peer, kPositionTag, side, MPI_STATUS_IGNORE) !=
          MPI_SUCCESS)
        return;
      heard[static_cast<std::size_t>(peer)] = p;
      tell(peer);
    }
  }

  // ---- the world's inquiry: where does a silent rank wait? ----
  //
  // A peer that says nothing on a communicator's side channel may wait in a collective of
  // another communicator, or at the end of `run`. A rank that timed out asks such peers over
  // the side channel of the world communicator ("where do you wait?"); every rank waiting in any
  // collective answers there with a line, e.g. "waits in all_reduce over group dp (world ranks
  // 2 3)". MPI runs one thread at a time (MPI_THREAD_SERIALIZED), like these statics.

  static inline Impl* world_impl = nullptr;  // the world of `run` (the last `world()`)
  static inline Impl* current = nullptr;     // the communicator of the collective in progress
  static inline std::map<int, std::string> answers;  // world rank → where it said it waits

  std::string whereabouts() const {
    if (position[1] == kFinish) return "has returned from the function given to moefold::mpi::run";
    if (position[1] < 0) return fmt::format("is setting up a communicator over {}", group());
    return fmt::format("waits in {} over {}", kCollectives[static_cast<std::size_t>(position[1])],
                       group());
  }

  // Answers the questions that have come in over the world's side channel and records the
  // answers to ours.
  static void serve_world() {
    Impl const* w = world_impl;
    if (w == nullptr || w->side == MPI_COMM_NULL) return;
    for (;;) {
      int flag = 0;
      MPI_Status status;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kInquiryTag, w->side, &flag, &status) != MPI_SUCCESS || !flag)
        break;
      std::int64_t question = 0;
      if (MPI_Recv(&question, 1, MPI_INT64_T, status.MPI_SOURCE, kInquiryTag, w->side,
                   MPI_STATUS_IGNORE) != MPI_SUCCESS)
        break;
      std::string const& text =
          keep_text(current ? current->whereabouts() : std::string("is between collectives"));
      MPI_Request request = MPI_REQUEST_NULL;
      if (MPI_Isend(text.data(), static_cast<int>(text.size()), MPI_CHAR, status.MPI_SOURCE,
                    kWhereTag, w->side, &request) == MPI_SUCCESS)
        MPI_Request_free(&request);
    }
    for (;;) {
      int flag = 0, count = 0;
      MPI_Status status;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kWhereTag, w->side, &flag, &status) != MPI_SUCCESS || !flag ||
          MPI_Get_count(&status, MPI_CHAR, &count) != MPI_SUCCESS)
        break;
      std::string text(static_cast<std::size_t>(count), '\0');
      if (MPI_Recv(text.data(), count, MPI_CHAR, status.MPI_SOURCE, kWhereTag, w->side,
                   MPI_STATUS_IGNORE) != MPI_SUCCESS)
        break;
      answers[status.MPI_SOURCE] = std::move(text);
    }
  }

  // Asks the given world ranks where they wait, and listens until `until` for the answers.
  template <class TimePoint>
  void ask_world(std::vector<int> const& silent, TimePoint until) {
    Impl const* w = world_impl;
    if (w == nullptr || w->side == MPI_COMM_NULL || silent.empty()) return;
    static std::int64_t const question = 0;
    for (int r : silent) {
      answers.erase(r);
      MPI_Request request = MPI_REQUEST_NULL;
      if (MPI_Isend(&question, 1, MPI_INT64_T, r, kInquiryTag, w->side, &request) == MPI_SUCCESS)
        MPI_Request_free(&request);
    }
    auto answered = [&] {
      for (int r : silent)
        if (!answers.contains(r)) return false;
      return true;
    };
    while (!answered() && std::chrono::steady_clock::now() < until) {
      serve();
      serve_world();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  // After a timeout: tells every peer where we wait and listens for a grace period (a tenth of
  // the timeout, 0.25 … 10 s) until every peer has told its position. Returns what is known:
  // "ranks 0 1 3 arrived, rank 2 did not (…)", in world ranks.
  std::string who_arrived() {
    if (side == MPI_COMM_NULL) return "which ranks arrived is unknown";
    for (int q = 0; q < size; ++q)
      if (q != rank) tell(q);
    using clock = std::chrono::steady_clock;
    auto const grace =
        std::clamp<milliseconds>(timeout / 10, milliseconds(250), milliseconds(10'000));
    auto const until = clock::now() + grace;
    auto heard_all = [&] {
      for (int q = 0; q < size; ++q)
        if (q != rank && heard[static_cast<std::size_t>(q)][0] < position[0]) return false;
      return true;
    };
    while (!heard_all() && clock::now() < until) {
      serve();
      serve_world();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    // The peers silent here may wait elsewhere: ask them over the world.
    std::vector<int> silent;
    for (int q = 0; q < size; ++q)
      if (q != rank && heard[static_cast<std::size_t>(q)][0] < position[0])
        silent.push_back(world_ranks[static_cast<std::size_t>(q)]);
    ask_world(silent, clock::now() + grace);
    std::vector<int> arrived, missing;
    std::vector<std::string> notes;
    for (int q = 0; q < size; ++q) {
      int const w = world_ranks[static_cast<std::size_t>(q)];
      Position const& p = heard[static_cast<std::size_t>(q)];
      if (q == rank || p == position) {
        arrived.push_back(w);
        continue;
      }
      missing.push_back(w);
      if (std::find(silent.begin(), silent.end(), w) != silent.end() && answers.contains(w))
        notes.push_back(fmt::format("rank {} {}", w, answers[w]));
      else if (p[1] == kFinish)
        notes.push_back(
            fmt::format("rank {} has returned from the function given to moefold::mpi::run", w));
      else if (p[0] == position[0] && p[1] >= 0 &&
               p[1] < static_cast<std::int64_t>(kCollectives.size()))
        notes.push_back(fmt::format("rank {} called {} as collective #{} on this group instead", w,
                                    kCollectives[static_cast<std::size_t>(p[1])], p[0]));
      else if (p[0] >= 0 && p[1] >= 0 && p[1] < static_cast<std::int64_t>(kCollectives.size()))
        notes.push_back(
            fmt::format("rank {} waits in {}, its collective #{} on this group, "
                        "while this is #{}",
                        w, kCollectives[static_cast<std::size_t>(p[1])], p[0], position[0]));
    }
    return moefold::detail::arrival_text(arrived, missing, notes);
  }

  // ---- completion against the deadline ----

  // Polls `requests` with MPI_Testall and growing sleeps (10 µs … 1 ms) until they are done
  // (MPI_SUCCESS), an MPI error comes back (its code) or the deadline passes (kTimedOut). Once
  // the sleeps are long, it serves the side channel.
  static constexpr int kTimedOut = -1;
  int wait(std::span<MPI_Request> requests) {
    using clock = std::chrono::steady_clock;
    auto const deadline = clock::now() + timeout;
    auto pause = std::chrono::microseconds(10);
    constexpr auto kLongest = std::chrono::microseconds(1000);
    std::vector<MPI_Status> statuses(requests.size());
    int const n = static_cast<int>(requests.size());
    for (;;) {
      int done = 0;
      int const code = MPI_Testall(n, requests.data(), &done, statuses.data());
      if (code == MPI_ERR_IN_STATUS) {
        for (auto const& s : statuses)
          if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) return s.MPI_ERROR;
      }
      if (code != MPI_SUCCESS) return code;
      if (done) return MPI_SUCCESS;
      if (clock::now() >= deadline) return kTimedOut;
      if (pause == kLongest) {
        serve();
        serve_world();
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, kLongest);
    }
  }

  // Completes the requests of collective `call` against the deadline. On a timeout or an MPI
  // error the communicator is unusable and the error (`errc::timeout` or
  // `errc::communication`) names the ranks that arrived and those that did not, with where the
  // latter wait when they said. `staging` holds buffers MPI writes, kept alive forever then.
  void complete(std::span<MPI_Request> requests, std::string_view call,
                std::vector<std::vector<float>>* staging = nullptr) {
    int const code = wait(requests);
    if (code == MPI_SUCCESS) return;
    if (staging) keep_forever(*staging);
    std::string const what =
        code == kTimedOut
            ? fmt::format("timed out after {}", moefold::detail::duration_text(timeout))
            : fmt::format("failed: MPI_Testall failed: {} (MPI error {})", detail::error_text(code),
                          code);
    broken = fmt::format(
        "mpi: collective {} over {} {}: {} (this is world rank {}); this communicator is now "
        "unusable",
        call, group(), what, who_arrived(), world_ranks[static_cast<std::size_t>(rank)]);
    throw error(code == kTimedOut ? errc::timeout : errc::communication, broken);
  }
  void complete(MPI_Request& request, std::string_view call,
                std::vector<std::vector<float>>* staging = nullptr) {
    complete(std::span<MPI_Request>(&request, 1), call, staging);
  }

  // Completes the point-to-point operations of `exchange` against the deadline; on a timeout
  // the error names the peers whose sends or receives did not complete.
  void complete_exchange(std::span<MPI_Request> requests, std::span<P2POp const> ops,
                         std::string_view call) {
    int const code = wait(requests);
    if (code == MPI_SUCCESS) return;
    if (code != kTimedOut) fail(code, call, "MPI_Testall");
    std::vector<std::string> pending;
    for (std::size_t i = 0; i < ops.size(); ++i) {
      int flag = 0;
      if (requests[i] != MPI_REQUEST_NULL &&
          MPI_Test(&requests[i], &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag)
        continue;
      int const peer = world_ranks[static_cast<std::size_t>(ops[i].peer)];
      pending.push_back(
          ops[i].kind == P2POp::Kind::send
              ? fmt::format("the send to world rank {} (tag {})", peer, ops[i].tag)
              : fmt::format("the receive from world rank {} (tag {})", peer, ops[i].tag));
    }
    broken = fmt::format(
        "mpi: {} on {} timed out after {}: world rank {} still waits for {}; this communicator "
        "is now unusable",
        call, group(), moefold::detail::duration_text(timeout),
        world_ranks[static_cast<std::size_t>(rank)], fmt::join(pending, ", "));
    throw error(errc::timeout, broken);
  }
};

// ---- Communicator --------------------------------------------------------------------------

Communicator::Communicator() : impl_(std::make_shared<Impl>()) {}
Communicator::Communicator(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}

Communicator Communicator::world(Options const& options) {
  MOEFOLD_EXPECTS(options.timeout.count() > 0,
                  "mpi world: the timeout must be positive (got {} ms)", options.timeout.count());
  if (!Environment::active())
    throw error(errc::unavailable,
                "mpi world: MPI is not initialized (create a moefold::mpi::Environment first, "
                "or run inside moefold::mpi::run)");
  constexpr std::string_view call = "world (duplicating MPI_COMM_WORLD)";
  Impl world_view(MPI_COMM_WORLD, options.timeout, /*own=*/false, call);
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request request = MPI_REQUEST_NULL;
  world_view.post(MPI_Comm_idup(MPI_COMM_WORLD, &dup, &request), call, "MPI_Comm_idup");
  world_view.complete(request, call);
  auto impl = std::make_shared<Impl>(dup, options.timeout, /*own=*/true, call);
  Impl::world_impl = impl.get();
  return Communicator(std::move(impl));
}

int Communicator::rank() const { return impl_->rank; }
int Communicator::size() const { return impl_->size; }
bool Communicator::valid() const { return impl_->comm != MPI_COMM_NULL; }
std::vector<int> const& Communicator::world_ranks() const { return impl_->world_ranks; }
std::chrono::milliseconds Communicator::timeout() const { return impl_->timeout; }
std::string const& Communicator::group_name() const { return impl_->name; }
void Communicator::set_group_name(std::string name) { impl_->name = std::move(name); }

void Communicator::set_timeout(std::chrono::milliseconds timeout) {
  MOEFOLD_EXPECTS(timeout.count() > 0, "mpi set_timeout: the timeout must be positive (got {} ms)",
                  timeout.count());
  impl_->timeout = timeout;
}

Traffic& Communicator::traffic_counters() { return impl_->traffic; }
Traffic const& Communicator::traffic_counters() const { return impl_->traffic; }

void Communicator::raw_barrier() {
  Impl& m = *impl_;
  m.begin("barrier");
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibarrier(m.comm, &request), "barrier", "MPI_Ibarrier");
  m.complete(request, "barrier");
}

void Communicator::finish() {
  Impl& m = *impl_;
  constexpr std::string_view call = "finish";
  m.begin(call);
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibarrier(m.comm, &request), call, "MPI_Ibarrier");
  m.complete(request, "barrier (at the end of moefold::mpi::run)");
}

void Communicator::raw_all_reduce(void* data, std::size_t count, DType dtype, ReduceOp op) {
  Impl& m = *impl_;
  constexpr std::string_view call = "all_reduce";
  m.begin(call);
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
  m.begin(call);
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibcast(data, to_int(count, call, "count"), mpi_type(dtype), root, m.comm, &request),
         call, "MPI_Ibcast");
  m.complete(request, call);
}

void Communicator::raw_all_gather_v(void const* send, void* recv,
                                    std::span<std::size_t const> counts, DType dtype) {
  Impl& m = *impl_;
  constexpr std::string_view call = "all_gather_v";
  m.begin(call);
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
  m.begin(call);
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
  m.begin(call);
  IntLayout const s = int_layout(send_counts, call, "send_counts");
  IntLayout const r = int_layout(recv_counts, call, "recv_counts");
  MPI_Datatype const type = mpi_type(dtype);
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ialltoallv(send, s.counts.data(), s.displs.data(), type, recv, r.counts.data(),
                        r.displs.data(), type, m.comm, &request),
         call, "MPI_Ialltoallv");
  m.complete(request, call);
}

struct Communicator::Started::State {
  std::shared_ptr<Impl> impl;
  MPI_Request request = MPI_REQUEST_NULL;
  IntLayout send, recv;  // MPI reads the counts and displacements until completion
  int uncaught = 0;

  void complete() {
    Impl& m = *impl;
    m.started = {};
    m.complete(request, "all_to_all_v");
  }
};

Communicator::Started::Started(std::unique_ptr<State> state) : s_(std::move(state)) {}
Communicator::Started::Started(Started&&) noexcept = default;

void Communicator::Started::wait() {
  if (!s_)
    throw error(errc::invalid_argument,
                "mpi: wait() on the handle of a started collective that was already waited for "
                "(or moved from)");
  std::unique_ptr<State> const s = std::move(s_);
  s->complete();
}

Communicator::Started::~Started() {
  if (!s_) return;
  if (std::uncaught_exceptions() > s_->uncaught) {
    try {
      s_->complete();
    } catch (...) {
    }
    return;
  }
  Impl const& m = *s_->impl;
  std::string const msg = fmt::format(
      "mpi: world rank {} dropped the handle of a started all_to_all_v on {} without wait(); "
      "aborting the job",
      m.world_ranks[static_cast<std::size_t>(m.rank)], m.group());
  std::fprintf(stderr, "%s\n", msg.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

Communicator::Started Communicator::raw_start_all_to_all_v(void const* send,
                                                           std::vector<std::size_t> send_counts,
                                                           void* recv,
                                                           std::vector<std::size_t> recv_counts,
                                                           DType dtype) {
  Impl& m = *impl_;
  constexpr std::string_view call = "all_to_all_v";
  m.begin(call);
  auto s = std::make_unique<Started::State>();
  s->impl = impl_;
  s->send = int_layout(send_counts, call, "send_counts");
  s->recv = int_layout(recv_counts, call, "recv_counts");
  s->uncaught = std::uncaught_exceptions();
  MPI_Datatype const type = mpi_type(dtype);
  m.post(MPI_Ialltoallv(send, s->send.counts.data(), s->send.displs.data(), type, recv,
                        s->recv.counts.data(), s->recv.displs.data(), type, m.comm, &s->request),
         call, "MPI_Ialltoallv");
  m.started = call;
  return Started(std::move(s));
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
  m.complete_exchange(requests, ops, call);
}

Communicator Communicator::raw_split(int color, int key) {
  Impl& m = *impl_;
  m.begin("split");
  // MPI_Comm_split blocks: a barrier against the deadline first turns a missing peer into a
  // timeout instead of a hang.
  MPI_Request request = MPI_REQUEST_NULL;
  m.post(MPI_Ibarrier(m.comm, &request), "split", "MPI_Ibarrier");
  m.complete(request, "split");
  MPI_Comm out = MPI_COMM_NULL;
  m.post(MPI_Comm_split(m.comm, color == kUndefinedColor ? MPI_UNDEFINED : color, key, &out),
         "split", "MPI_Comm_split");
  if (out == MPI_COMM_NULL) return Communicator();
  return Communicator(std::make_shared<Impl>(out, m.timeout, /*own=*/true, "split"));
}

}  // namespace mpi
}  // namespace v0
}  // namespace moefold
