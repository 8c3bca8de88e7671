#pragma once
/// \file
/// `AllGatherTokenDispatcher` (policy tag `AllGatherDispatcher<Drop>`): Megatron's
/// `MoEAllGatherTokenDispatcher` (spec §2.5) — all-gather tokens, routing and probabilities over
/// `tp_ep`, select the local experts' entries, and reduce-scatter the weighted outputs back.
/// Every rank of `tp_ep` must hold the same number of tokens.

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/detail/expert_rows.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/dispatch.hpp"

namespace moefold {
inline namespace v0 {

/// The all-gather token dispatcher over the expert groups of one rank. Its row maps are built
/// by the instance from the gathered routing in the instance's memory; the host sees the counts
/// (one copy per plan).
template <ExecutionInstance Exec, DropPolicy Drop, Communicator Comm, class Real = float>
class AllGatherTokenDispatcher {
 public:
  using real_type = Real;
  using exec_type = Exec;
  using Space = typename Exec::memory_space;

  AllGatherTokenDispatcher(Exec exec, DispatcherConfig cfg, Drop drop, ProcessGroups<Comm>& groups)
      : AllGatherTokenDispatcher(std::move(exec), cfg, drop, groups.ep(), groups.etp(),
                                 groups.tp_ep()) {}
  AllGatherTokenDispatcher(DispatcherConfig cfg, Drop drop, ProcessGroups<Comm>& groups)
    requires std::default_initializable<Exec>
      : AllGatherTokenDispatcher(Exec{}, cfg, drop, groups) {}
  AllGatherTokenDispatcher(DispatcherConfig cfg, Drop drop, Comm const& ep, Comm const& etp,
                           Comm tp_ep)
    requires std::default_initializable<Exec>
      : AllGatherTokenDispatcher(Exec{}, cfg, drop, ep, etp, std::move(tp_ep)) {}
  AllGatherTokenDispatcher(Exec exec, DispatcherConfig cfg, Drop drop, Comm const& ep,
                           Comm const& etp, Comm tp_ep)
      : exec_(std::move(exec)),
        cfg_(cfg),
        drop_(drop),
        tp_ep_(std::move(tp_ep)),
        my_ep_(ep.rank()),
        ep_size_(ep.size()),
        etp_size_(etp.size()),
        experts_(exec_) {
    l_ = detail::check_expert_groups(cfg_, ep, etp, tp_ep_);
  }

  DispatchMetadata const& metadata() const noexcept { return meta_; }

  /// Per-microbatch saved state (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

  /// Applies the drop policy locally, all-gathers the routing map over `tp_ep` and selects the
  /// local experts' entries. Collective over `tp_ep`; throws when ranks hold different T.
  /// Copies E + L counts to the host, once.
  DispatchMetadata const& plan(Routing<Real, Space> const& routing) {
    auto const cap = detail::accept_routing(exec_, routing, routing_, cfg_, drop_, workspace_,
                                            "AllGatherDispatcher::plan");
    auto const W = tp_ep_.size();
    std::int64_t const E = cfg_.num_experts;
    std::vector<std::int64_t> ts(static_cast<std::size_t>(W));
    std::int64_t const mine = routing_.num_tokens;
    tp_ep_.all_gather(std::span<std::int64_t const>(&mine, 1), std::span<std::int64_t>(ts));
    for (auto t : ts)
      MOEFOLD_EXPECTS(t == mine,
                      "AllGatherDispatcher needs the same token count on every tp_ep rank (this "
                      "rank has {}, another {})",
                      mine, t);
    gathered_tokens_ = mine * W;
    auto all = exec_.template allocate<Route>(gathered_tokens_ * E);
    detail::collective<Exec, Comm, std::uint8_t>(
        exec_, tp_ep_, as_bytes(routing_.map.view()), as_bytes(all.view()),
        [&](std::span<std::uint8_t const> in, std::span<std::uint8_t> out) {
          tp_ep_.all_gather(in, out);
        },
        "all-gather of the routing over tp_ep");

    meta_ = DispatchMetadata{};
    meta_.ep_size = ep_size_;
    meta_.etp_size = etp_size_;
    meta_.num_local_experts = l_;
    meta_.num_tokens = mine;
    meta_.capacity = cap ? *cap : -1;
    meta_.padded = Drop::drops && drop_.pad_to_capacity;
    // Counts: this rank's entries per expert, and the gathered entries per local expert.
    auto const first = static_cast<std::int64_t>(my_ep_) * l_;
    auto const all_map = View<Route const, Space>(all.view(gathered_tokens_, E));
    auto const keys = sized(keys_, mine * E);
    ExpertMajorOrderIn<Space>::keys(exec_, routing_, keys);
    auto const local_keys = sized(local_keys_, gathered_tokens_ * l_);
    ops::local_expert_keys<Exec, Route>(exec_, all_map, Route::none, first, l_, local_keys);
    detail::PlanCounts<Exec> counts(exec_, {E, static_cast<std::int64_t>(l_)});
    counts.count(0, keys);
    counts.count(1, local_keys);
    counts.check_finite(routing, status_keys_);
    counts.to_host("AllGatherDispatcher::plan");  // the one copy to the host
    meta_.local_tokens_per_expert = counts.host(0);
    meta_.num_out = detail::total(meta_.local_tokens_per_expert);
    meta_.tokens_per_local_expert = counts.host(1);
    auto const rows = meta_.num_expert_rows();
    auto sorted = exec_.template allocate<std::int64_t>(rows);
    stable_sort_by_key<std::int64_t>(exec_, View<std::int64_t const, Space>(local_keys), l_,
                                     sorted.view());
    auto src = exec_.template allocate<std::int64_t>(rows);
    entry_ = exec_.template allocate<std::int64_t>(rows);
    ops::local_expert_rows<Exec, Route>(exec_, sorted.view(), all_map, Route::routed, first,
                                        src.view(), entry_.view());
    experts_.set_map(RowMapIn<Space>(exec_, std::move(src), gathered_tokens_));
    return meta_;
  }

  /// All-gathers `hidden [T, H]` and `probs [T, E]` over `tp_ep` and gathers the local experts'
  /// rows. Collective over `tp_ep`.
  DispatchOutput<Real, Space> dispatch(View<Real const, Space> hidden, View<Real const, Space> probs) {
    auto const h = cfg_.hidden_size;
    MOEFOLD_EXPECTS(hidden.size() == routing_.num_tokens * h &&
                        probs.size() == static_cast<std::int64_t>(routing_.probs.size()),
                    "AllGatherDispatcher::dispatch: hidden {} and probs {} elements for T = {}",
                    hidden.size(), probs.size(), routing_.num_tokens);
    auto all = experts_.take(static_cast<std::size_t>(gathered_tokens_ * h));
    gather(hidden, all.view(), "all-gather of the tokens over tp_ep");
    auto all_p = exec_.template allocate<Real>(probs.size() * tp_ep_.size());
    gather(probs, all_p.view(), "all-gather of the probabilities over tp_ep");
    auto expert_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(entry_.size()));
    ops::gather_or_zero<Exec, Real>(exec_, entry_.view(), all_p.view(), expert_probs.view());
    auto out = experts_.to_experts(all.view(), h, std::move(expert_probs),
                                   meta_.tokens_per_local_expert);
    experts_.give(std::move(all));
    return out;
  }

  /// Weighted scatter of the expert rows into the gathered tokens, then reduce-scatter over
  /// `tp_ep`: `[T, H]`. Collective over `tp_ep`.
  Buffer<Real, Space> combine(View<Real const, Space> expert_output) {
    auto const h = cfg_.hidden_size;
    auto all = experts_.combine(expert_output, gathered_tokens_, h, "AllGatherDispatcher");
    auto out = exec_.template allocate<Real>(routing_.num_tokens * h);
    scatter(all.view(), out.view(), "reduce-scatter of the outputs over tp_ep");
    experts_.give(std::move(all));
    return out;
  }

  CombineGrad<Real, Space> combine_backward(View<Real const, Space> d_output) {
    auto const h = cfg_.hidden_size;
    MOEFOLD_EXPECTS(d_output.size() == routing_.num_tokens * h,
                    "AllGatherDispatcher::combine_backward: gradient has {} elements, expected T·H",
                    d_output.size());
    auto all = experts_.take(static_cast<std::size_t>(gathered_tokens_ * h));
    gather(d_output, all.view(), "all-gather of the output gradient over tp_ep");
    auto out = experts_.combine_backward(all.view(), h);
    experts_.give(std::move(all));
    return out;
  }

  DispatchGrad<Real, Space> dispatch_backward(View<Real const, Space> d_expert_input,
                                              View<Real const, Space> d_expert_probs) {
    auto const h = cfg_.hidden_size;
    auto all = experts_.dispatch_backward(d_expert_input, d_expert_probs, gathered_tokens_, h,
                                          "AllGatherDispatcher");
    auto all_p = exec_.template allocate<Real>(
        static_cast<std::int64_t>(routing_.probs.size()) * tp_ep_.size());
    ops::fill(exec_, all_p.view(), Real(0));
    ops::scatter<Exec, Real>(exec_, entry_.view(), d_expert_probs, all_p.view(), /*add=*/true);
    DispatchGrad<Real, Space> out;
    out.d_hidden = exec_.template allocate<Real>(routing_.num_tokens * h);
    scatter(all.view(), out.d_hidden.view(), "reduce-scatter of the input gradient over tp_ep");
    out.d_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(routing_.probs.size()));
    scatter(all_p.view(), out.d_probs.view(), "reduce-scatter of the probability gradient over tp_ep");
    experts_.give(std::move(all));
    return out;
  }

 private:
  /// `b` as n elements (reallocated only when its size changes).
  View<std::int64_t, Space> sized(Buffer<std::int64_t, Space>& b, std::int64_t n) {
    if (static_cast<std::int64_t>(b.size()) != n) b = exec_.template allocate<std::int64_t>(n);
    return b.view();
  }
  /// The routing entries as bytes (what the communicator moves).
  template <class R>
  static auto as_bytes(View<R, Space> v) {
    using B = std::conditional_t<std::is_const_v<R>, std::uint8_t const, std::uint8_t>;
    static_assert(sizeof(R) == 1);
    return View<B, Space>(reinterpret_cast<B*>(v.data()), v.size());
  }
  /// All-gather over tp_ep.
  void gather(View<Real const, Space> in, View<Real, Space> out, char const* what) {
    detail::collective<Exec, Comm, Real>(
        exec_, tp_ep_, in, out,
        [&](std::span<Real const> i, std::span<Real> o) { tp_ep_.all_gather(i, o); }, what);
  }
  /// Reduce-scatter (sum) over tp_ep.
  void scatter(View<Real const, Space> in, View<Real, Space> out, char const* what) {
    detail::collective<Exec, Comm, Real>(
        exec_, tp_ep_, in, out,
        [&](std::span<Real const> i, std::span<Real> o) {
          tp_ep_.reduce_scatter(i, o, ReduceOp::sum);
        },
        what);
  }

  /// The plan and what combine and the backwards read.
  auto saved() {
    return std::tuple_cat(std::tie(meta_, routing_, gathered_tokens_, entry_), experts_.saved());
  }

  Exec exec_;
  DispatcherConfig cfg_;
  Drop drop_;
  Comm tp_ep_;
  int my_ep_ = 0, ep_size_ = 1, etp_size_ = 1;
  int l_ = 1;
  DispatchMetadata meta_;
  Routing<Real, Space> routing_;
  std::int64_t gathered_tokens_ = 0;
  detail::ExpertRows<Exec, Real> experts_;  // expert rows ↔ gathered tokens
  Buffer<std::int64_t, Space> entry_;  // gathered routed entry of each expert row (−1: padding)
  // Per-plan temporaries, reused: sort keys and the drop policy's rankings.
  Buffer<std::int64_t, Space> keys_, local_keys_, status_keys_, workspace_;
  MicrobatchStash stash_;
};

/// Policy tag: `AllGatherDispatcher<Drop>::dispatcher<Exec, Comm, Real>` is the dispatcher type.
template <DropPolicy Drop = Dropless>
struct AllGatherDispatcher {
  using drop_policy = Drop;
  template <class Exec, class Comm, class Real = float>
  using dispatcher = AllGatherTokenDispatcher<Exec, Drop, Comm, Real>;
};

namespace cpu {
template <DropPolicy Drop, Communicator Comm, class Real = float>
using AllGatherTokenDispatcher = moefold::AllGatherTokenDispatcher<Cpu, Drop, Comm, Real>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
