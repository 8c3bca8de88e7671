#pragma once
/// \file
/// `AllGatherTokenDispatcher` (policy tag `AllGatherDispatcher<Drop>`): Megatron's
/// `MoEAllGatherTokenDispatcher` (spec §2.5) — all-gather tokens, routing and probabilities over
/// `tp_ep`, select the local experts' entries, and reduce-scatter the weighted outputs back.
/// Every rank of `tp_ep` must hold the same number of tokens.

#include <cstdint>
#include <span>
#include <vector>

#include "moefold/moe/all_to_all_dispatcher.hpp"
#include "moefold/moe/detail/expert_rows.hpp"

namespace moefold {
inline namespace v0 {

/// The all-gather token dispatcher over the expert groups of one rank.
template <HostInstance Exec, DropPolicy Drop, Communicator Comm, class Real = float>
class AllGatherTokenDispatcher {
 public:
  using real_type = Real;
  using exec_type = Exec;

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

  /// Applies the drop policy locally, all-gathers the routing map over `tp_ep` and selects the
  /// local experts' entries. Collective over `tp_ep`; throws when ranks hold different T.
  DispatchMetadata const& plan(Routing<Real> const& routing) {
    auto const cap =
        detail::accept_routing(routing, routing_, cfg_, drop_, "AllGatherDispatcher::plan");
    auto const W = static_cast<std::size_t>(tp_ep_.size());
    auto const E = static_cast<std::size_t>(cfg_.num_experts);
    auto const L = static_cast<std::size_t>(l_);
    std::vector<std::int64_t> ts(W);
    std::int64_t const mine = routing_.num_tokens;
    tp_ep_.all_gather(std::span<std::int64_t const>(&mine, 1), std::span<std::int64_t>(ts));
    for (auto t : ts)
      MOEFOLD_EXPECTS(t == mine,
                      "AllGatherDispatcher needs the same token count on every tp_ep rank (this "
                      "rank has {}, another {})",
                      mine, t);
    std::vector<std::uint8_t> local(routing_.map.size()), all(routing_.map.size() * W);
    for (std::size_t i = 0; i < local.size(); ++i)
      local[i] = static_cast<std::uint8_t>(routing_.map[i]);
    tp_ep_.all_gather(std::span<std::uint8_t const>(local), std::span<std::uint8_t>(all));
    gathered_tokens_ = mine * static_cast<std::int64_t>(W);

    meta_ = DispatchMetadata{};
    meta_.ep_size = ep_size_;
    meta_.etp_size = etp_size_;
    meta_.num_local_experts = l_;
    meta_.num_tokens = mine;
    meta_.local_tokens_per_expert = routing_.tokens_per_expert();
    meta_.num_out = detail::total(meta_.local_tokens_per_expert);
    meta_.capacity = cap ? *cap : -1;
    meta_.padded = Drop::drops && drop_.pad_to_capacity;
    meta_.tokens_per_local_expert.assign(L, 0);
    std::vector<std::int64_t> src;
    entry_.clear();
    for (std::size_t l = 0; l < L; ++l) {
      auto const e = static_cast<std::size_t>(my_ep_) * L + l;
      for (std::int64_t u = 0; u < gathered_tokens_; ++u) {
        auto const at = static_cast<std::size_t>(u) * E + e;
        if (all[at] == static_cast<std::uint8_t>(Route::none)) continue;
        src.push_back(u);
        entry_.push_back(all[at] == static_cast<std::uint8_t>(Route::routed)
                             ? static_cast<std::int64_t>(at)
                             : -1);
        ++meta_.tokens_per_local_expert[l];
      }
    }
    experts_.set_map(RowMap(exec_, std::move(src), gathered_tokens_));
    return meta_;
  }

  /// All-gathers `hidden [T, H]` and `probs [T, E]` over `tp_ep` and gathers the local experts'
  /// rows. Collective over `tp_ep`.
  DispatchOutput<Real> dispatch(View<Real const> hidden, View<Real const> probs) {
    auto const h = cfg_.hidden_size;
    MOEFOLD_EXPECTS(hidden.size() == routing_.num_tokens * h &&
                        probs.size() == static_cast<std::int64_t>(routing_.probs.size()),
                    "AllGatherDispatcher::dispatch: hidden {} and probs {} elements for T = {}",
                    hidden.size(), probs.size(), routing_.num_tokens);
    auto& pool = experts_.pool();
    Buffer<Real> all = pool.take(static_cast<std::size_t>(gathered_tokens_ * h));
    tp_ep_.all_gather(std::span<Real const>(hidden), std::span<Real>(all));
    Buffer<Real> all_p = exec_.template allocate<Real>(probs.size() * tp_ep_.size());
    tp_ep_.all_gather(std::span<Real const>(probs), std::span<Real>(all_p));
    Buffer<Real> expert_probs =
        exec_.template allocate<Real>(static_cast<std::int64_t>(entry_.size()));
    ops::gather_or_zero<Exec, Real>(exec_, View<std::int64_t const>(entry_), all_p.view(),
                                    expert_probs.view());
    auto out = experts_.to_experts(all, h, std::move(expert_probs), meta_.tokens_per_local_expert);
    pool.give(std::move(all));
    return out;
  }

  /// Weighted scatter of the expert rows into the gathered tokens, then reduce-scatter over
  /// `tp_ep`: `[T, H]`. Collective over `tp_ep`.
  Buffer<Real> combine(View<Real const> expert_output) {
    auto const h = cfg_.hidden_size;
    auto all = experts_.combine(expert_output, gathered_tokens_, h, "AllGatherDispatcher");
    Buffer<Real> out = exec_.template allocate<Real>(routing_.num_tokens * h);
    tp_ep_.reduce_scatter(std::span<Real const>(all), std::span<Real>(out), ReduceOp::sum);
    experts_.pool().give(std::move(all));
    return out;
  }

  CombineGrad<Real> combine_backward(View<Real const> d_output) {
    auto const h = cfg_.hidden_size;
    MOEFOLD_EXPECTS(d_output.size() == routing_.num_tokens * h,
                    "AllGatherDispatcher::combine_backward: gradient has {} elements, expected T·H",
                    d_output.size());
    Buffer<Real> all = experts_.pool().take(static_cast<std::size_t>(gathered_tokens_ * h));
    tp_ep_.all_gather(std::span<Real const>(d_output), std::span<Real>(all));
    auto out = experts_.combine_backward(all, h);
    experts_.pool().give(std::move(all));
    return out;
  }

  DispatchGrad<Real> dispatch_backward(View<Real const> d_expert_input,
                                       View<Real const> d_expert_probs) {
    auto const h = cfg_.hidden_size;
    auto all = experts_.dispatch_backward(d_expert_input, d_expert_probs, gathered_tokens_, h,
                                          "AllGatherDispatcher");
    Buffer<Real> all_p = exec_.template allocate<Real>(
        static_cast<std::int64_t>(routing_.probs.size()) * tp_ep_.size());
    ops::scatter<Exec, Real>(exec_, View<std::int64_t const>(entry_), d_expert_probs, all_p.view(),
                             /*add=*/true);
    DispatchGrad<Real> out;
    out.d_hidden = exec_.template allocate<Real>(routing_.num_tokens * h);
    tp_ep_.reduce_scatter(std::span<Real const>(all), std::span<Real>(out.d_hidden), ReduceOp::sum);
    out.d_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(routing_.probs.size()));
    tp_ep_.reduce_scatter(std::span<Real const>(all_p), std::span<Real>(out.d_probs),
                          ReduceOp::sum);
    experts_.pool().give(std::move(all));
    return out;
  }

 private:
  Exec exec_;
  DispatcherConfig cfg_;
  Drop drop_;
  Comm tp_ep_;
  int my_ep_ = 0, ep_size_ = 1, etp_size_ = 1;
  int l_ = 1;
  DispatchMetadata meta_;
  Routing<Real> routing_;
  std::int64_t gathered_tokens_ = 0;
  detail::ExpertRows<Exec, Real> experts_;  // expert rows ↔ gathered tokens
  std::vector<std::int64_t> entry_;  // gathered routed entry of each expert row (−1: padding)
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
