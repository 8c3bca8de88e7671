#pragma once
// Fault injection for the communicator tests: `FaultInjecting<Comm>` is a real communicator
// (every call goes to the wrapped backend) that makes one rank misbehave at its n-th call of one
// collective — inside a token dispatcher or a pipeline step, where real faults happen:
//   - throw_error: throws `moefold::error` (category internal) naming the rank;
//   - stall: sleeps for `stall`, then makes the call late;
//   - other_collective: calls `barrier` instead;
//   - return_early: throws `ReturnEarly`, which the test's rank function catches to return
//     from it as a rank that simply stops would;
//   - exit_process: ends the process with `std::exit(0)` (MPI: without MPI_Finalize).
// Its splits inherit the plan and share one call counter per rank, so "the first all_to_all_v"
// counts over every group of the rank.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/core/error.hpp"
#include "moefold/mesh/folded_mapping.hpp"
#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/capacity.hpp"
#include "moefold/moe/routing.hpp"

namespace moefold::test {

enum class Fault { throw_error, stall, other_collective, return_early, exit_process };

constexpr std::string_view name(Fault f) noexcept {
  switch (f) {
    case Fault::throw_error:
      return "throw";
    case Fault::stall:
      return "stall";
    case Fault::other_collective:
      return "other-collective";
    case Fault::return_early:
      return "return";
    case Fault::exit_process:
      return "exit";
  }
  return "?";
}

/// What the faulty rank does, and when: at its `occurrence`-th call (1-based) of `call`.
struct FaultPlan {
  Fault fault = Fault::throw_error;
  std::string_view call = "all_to_all_v";
  int occurrence = 1;
  std::chrono::milliseconds stall{0};  ///< how long `stall` sleeps
  int world_rank = 0;                  ///< the faulty rank, for the messages
};

/// Thrown by `Fault::return_early`: the rank function catches it and returns.
struct ReturnEarly {};

template <class Inner>
class FaultInjecting : public CollectiveApi<FaultInjecting<Inner>> {
 public:
  FaultInjecting() = default;
  /// Wraps `inner`; `plan` is null on every rank but the faulty one.
  FaultInjecting(Inner inner, std::shared_ptr<FaultPlan const> plan)
      : inner_(std::move(inner)), plan_(std::move(plan)), calls_(std::make_shared<int>(0)) {}

  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  bool valid() const { return inner_.valid(); }
  Inner& inner() noexcept { return inner_; }
  void set_group_name(std::string n) { inner_.set_group_name(std::move(n)); }

  Traffic& traffic_counters() { return inner_.traffic_counters(); }
  Traffic const& traffic_counters() const { return inner_.traffic_counters(); }

  void raw_barrier() {
    if (before("barrier")) inner_.raw_barrier();
  }
  void raw_all_reduce(void* d, std::size_t n, DType t, ReduceOp op) {
    if (before("all_reduce")) inner_.raw_all_reduce(d, n, t, op);
  }
  void raw_broadcast(void* d, std::size_t n, DType t, int root) {
    if (before("broadcast")) inner_.raw_broadcast(d, n, t, root);
  }
  void raw_all_gather_v(void const* s, void* r, std::span<std::size_t const> c, DType t) {
    if (before("all_gather_v")) inner_.raw_all_gather_v(s, r, c, t);
  }
  void raw_reduce_scatter_v(void const* s, void* r, std::span<std::size_t const> c, DType t,
                            ReduceOp op) {
    if (before("reduce_scatter_v")) inner_.raw_reduce_scatter_v(s, r, c, t, op);
  }
  void raw_all_to_all_v(void const* s, std::span<std::size_t const> sc, void* r,
                        std::span<std::size_t const> rc, DType t) {
    if (before("all_to_all_v")) inner_.raw_all_to_all_v(s, sc, r, rc, t);
  }
  void raw_exchange(std::span<P2POp const> ops) {
    if (before("exchange")) inner_.raw_exchange(ops);
  }
  FaultInjecting raw_split(int color, int key) {
    FaultInjecting out(inner_.raw_split(color, key), plan_);
    out.calls_ = calls_;
    return out;
  }

 private:
  // Injects the fault when this is its call; false when the wrapped call must be skipped.
  bool before(std::string_view call) {
    if (!plan_ || call != plan_->call || ++*calls_ != plan_->occurrence) return true;
    switch (plan_->fault) {
      case Fault::throw_error:
        throw error(errc::internal,
                    fmt::format("injected fault: world rank {} throws in its {} #{}",
                                plan_->world_rank, call, plan_->occurrence));
      case Fault::stall:
        std::this_thread::sleep_for(plan_->stall);
        return true;
      case Fault::other_collective:
        inner_.raw_barrier();
        return false;
      case Fault::return_early:
        throw ReturnEarly{};
      case Fault::exit_process:
        std::exit(0);
    }
    return true;
  }

  Inner inner_{};
  std::shared_ptr<FaultPlan const> plan_{};
  std::shared_ptr<int> calls_ = std::make_shared<int>(0);
};

/// The folding of the fault scenarios: 4 ranks, attention TP2 × DP2, MoE EP4, so the EP group
/// (world ranks 0 1 2 3) spans attention TP and DP ranks.
inline FoldedMapping fault_folding() {
  return FoldedMapping::from({.world = 4, .tp = 2, .ep = 4, .etp = 1});
}

/// One dropless all-to-all token dispatch on `fault_folding()` (8 experts, top-2, 4 tokens of
/// width 3 per rank) over `world` wrapped with `plan` (null on the healthy ranks): the fault
/// fires inside `AllToAllDispatcher::dispatch`, at its token all-to-all over `ep`.
/// Collective over `world`.
template <class Comm>
void dispatch_with_fault(Comm world, std::shared_ptr<FaultPlan const> plan) {
  using Faulty = FaultInjecting<Comm>;
  ProcessGroups<Faulty> groups(fault_folding(), Faulty(std::move(world), std::move(plan)));
  constexpr std::int64_t kTokens = 4, kExperts = 8, kHidden = 3;
  constexpr int kTopK = 2;
  AllToAllDispatcher<Dropless>::dispatcher<Cpu, Faulty, float> d(
      {.num_experts = kExperts, .moe_router_topk = kTopK, .hidden_size = kHidden}, Dropless{},
      groups);
  int const me = groups.world().rank();
  std::vector<int> ids;
  std::vector<float> probs;
  for (std::int64_t t = 0; t < kTokens; ++t)
    for (int k = 0; k < kTopK; ++k) {
      ids.push_back(static_cast<int>((me + 3 * t + 5 * k) % kExperts));
      probs.push_back(0.5f);
    }
  auto const routing = Routing<float>::from_top_k(kTokens, kExperts, kTopK, ids, probs);
  std::vector<float> hidden(static_cast<std::size_t>(kTokens * kHidden), 1.0f);
  d.plan(routing);
  d.dispatch(hidden, routing.probs);
}

}  // namespace moefold::test
