#pragma once
/// \file
/// `AllToAllTokenDispatcher` (policy tag `AllToAllDispatcher<Drop>`): Megatron's
/// `MoEAlltoAllTokenDispatcher` (spec §2.4) — token counts all-gathered over `tp_ep`, AllToAll-V
/// over `ep`, AllGather-V over `etp` when ETP > 1, chunk sort by local expert; combine in
/// reverse (ReduceScatter-V over `etp`, AllToAll-V back, unpermute). With `dedup`, a token
/// crosses to each destination EP rank once and is expanded there. See docs/dispatcher.md.

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/capacity.hpp"
#include "moefold/moe/detail/expert_rows.hpp"
#include "moefold/moe/detail/peer_rows.hpp"
#include "moefold/moe/permutation.hpp"
#include "moefold/moe/token_dispatcher.hpp"
#include "moefold/nn/microbatch_stash.hpp"
#include "moefold/ops/dispatch.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/permute.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
/// The work of a dispatcher call with nothing to overlap.
struct NoWork {
  void operator()() const noexcept {}
};
inline std::vector<std::int64_t> scaled(std::span<std::int64_t const> v, std::int64_t w) {
  std::vector<std::int64_t> o(v.begin(), v.end());
  for (auto& x : o) x *= w;
  return o;
}
inline std::int64_t total(std::span<std::int64_t const> v) {
  return std::accumulate(v.begin(), v.end(), std::int64_t{0});
}
/// Checks the expert groups' shapes shared by both dispatchers; returns L.
template <class Comm>
int check_expert_groups(DispatcherConfig const& cfg, Comm const& ep, Comm const& etp,
                        Comm const& tp_ep) {
  if (cfg.num_experts < 1 || cfg.moe_router_topk < 1 || cfg.moe_router_topk > cfg.num_experts)
    throw invalid_config(fmt::format("dispatcher: need 1 ≤ moe_router_topk ({}) ≤ num_experts ({})",
                                     cfg.moe_router_topk, cfg.num_experts));
  if (cfg.hidden_size < 1)
    throw invalid_config(fmt::format("dispatcher: hidden_size {} < 1", cfg.hidden_size));
  if (cfg.num_experts % ep.size() != 0)
    throw invalid_config(fmt::format("num_experts ({}) must be divisible by the EP size ({})",
                                     cfg.num_experts, ep.size()));
  if (tp_ep.size() != ep.size() * etp.size() || tp_ep.rank() != etp.rank() + etp.size() * ep.rank())
    throw invalid_config(fmt::format(
        "dispatcher: tp_ep (rank {} of {}) is not the ETP-fastest product of etp (rank {} of {}) "
        "and ep (rank {} of {})",
        tp_ep.rank(), tp_ep.size(), etp.rank(), etp.size(), ep.rank(), ep.size()));
  return cfg.num_experts / ep.size();
}

/// The start of every dispatcher's `plan`: checks `routing` against the configuration, keeps a
/// copy in `kept` (the instance's memory) and applies the drop policy to it (capacity on this
/// rank's tokens). Returns the capacity per expert, or nothing when dropless.
template <class Drop, class Exec, class Real>
std::optional<std::int64_t> accept_routing(
    Exec const& exec, Routing<Real, typename Exec::memory_space> const& routing,
    Routing<Real, typename Exec::memory_space>& kept, DispatcherConfig const& cfg, Drop const& drop,
    Buffer<std::int64_t, typename Exec::memory_space>& workspace, char const* who) {
  routing.check_shape(who);
  MOEFOLD_EXPECTS(routing.num_experts == cfg.num_experts,
                  "{}: routing over {} experts, configured for {}", who, routing.num_experts,
                  cfg.num_experts);
  kept = routing.clone(exec);
  return apply_capacity(exec, drop, kept, cfg.moe_router_topk, workspace);
}

/// The counts a plan brings to the host, computed by the instance into one buffer and copied
/// in ONE transfer: histograms of sort keys, side by side, then the router's deferred
/// finiteness check of a device routing (the number of tokens with a NaN or infinite logit).
template <ExecutionInstance Exec>
class PlanCounts {
 public:
  using Space = typename Exec::memory_space;
  /// Reserves `bins` counts per histogram, in order, plus the status slot.
  PlanCounts(Exec const& exec, std::initializer_list<std::int64_t> bins) : exec_(&exec) {
    std::int64_t at = 0;
    for (auto b : bins) {
      start_.push_back(at);
      at += b;
    }
    start_.push_back(at);
    counts_ = exec.template allocate<std::int64_t>(at + 1);
    ops::fill(exec, counts_.view(), std::int64_t{0});
  }
  /// Histogram i of `keys` (keys outside [0, bins_i) are not counted).
  void count(std::size_t i, View<std::int64_t const, Space> keys) {
    histogram<std::int64_t>(*exec_, keys, counts_.view().cols(start_[i], start_[i + 1] - start_[i]));
  }
  /// The status slot counts the tokens of `routing` whose logits were not finite.
  template <class Real>
  void check_finite(Routing<Real, Space> const& routing, Buffer<std::int64_t, Space>& keys) {
    routing_non_finite_ = routing.non_finite.empty() ? nullptr : &routing.non_finite;
    if (!routing_non_finite_) return;
    auto const n = static_cast<std::int64_t>(routing.non_finite.size());
    if (static_cast<std::int64_t>(keys.size()) < n) keys = exec_->template allocate<std::int64_t>(n);
    ops::select_non_negative<Exec, std::int64_t>(*exec_, routing.non_finite.view(), 0, -1,
                                                 keys.view().cols(0, n));
    histogram<std::int64_t>(*exec_, View<std::int64_t const, Space>(keys.view().cols(0, n)),
                            counts_.view().cols(start_.back(), 1));
  }
  /// The one copy to the host; throws when the status counted non-finite logits.
  void to_host(char const* who) {
    host_.resize(counts_.size());
    copy<std::int64_t>(*exec_, View<std::int64_t const, Space>(counts_.view()),
                       View<std::int64_t>(host_));
    if (host_.back() == 0) return;
    // Error path: find the first such token (more copies do not matter here).
    std::vector<std::int64_t> bad(routing_non_finite_->size());
    copy<std::int64_t>(*exec_, routing_non_finite_->view(), View<std::int64_t>(bad));
    for (std::size_t t = 0; t < bad.size(); ++t)
      MOEFOLD_EXPECTS(bad[t] < 0,
                      "TopKRouter::forward: logit of token {} for expert {} is NaN or infinite "
                      "(NaN or infinite input or weight; found by {} on the device)",
                      t, bad[t], who);
  }
  /// Histogram i, on the host.
  std::vector<std::int64_t> host(std::size_t i) const {
    return {host_.begin() + start_[i], host_.begin() + start_[i + 1]};
  }

 private:
  Exec const* exec_;
  std::vector<std::int64_t> start_;
  Buffer<std::int64_t, Space> counts_;
  std::vector<std::int64_t> host_;
  Buffer<std::int64_t, Space> const* routing_non_finite_ = nullptr;
};

/// A collective of a dispatcher on buffers of `Space`: host memory goes to the communicator;
/// device memory needs a device communicator (NCCL, component `moefold::nccl`) unless the group
/// has one rank, where the collective is a copy by the instance.
template <class Exec, class Comm, class U, class Collective>
void collective(Exec const& exec, Comm const& group, View<U const, typename Exec::memory_space> in,
                View<U, typename Exec::memory_space> out, Collective&& run, char const* what) {
  if constexpr (Exec::memory_space::host_accessible) {
    (void)exec;
    (void)group;
    (void)what;
    run(std::span<U const>(in), std::span<U>(out));
  } else {
    MOEFOLD_EXPECTS(group.size() == 1,
                    "dispatcher {}: device memory crosses ranks only through a device "
                    "communicator; this group has {} ranks",
                    what, group.size());
    MOEFOLD_EXPECTS(in.size() == out.size(), "dispatcher {}: {} values in, {} out on one rank",
                    what, in.size(), out.size());
    copy<U>(exec, in.reshaped(1, in.size()), out.reshaped(1, out.size()));
  }
}
}  // namespace detail

/// The all-to-all token dispatcher over the expert groups of one rank. Its row maps are built
/// by the instance from the routing in the instance's memory; the host sees the counts per
/// expert (one copy per plan) and the splits derived from them.
template <ExecutionInstance Exec, DropPolicy Drop, Communicator Comm, class Real = float>
class AllToAllTokenDispatcher {
 public:
  using real_type = Real;
  using exec_type = Exec;
  using Space = typename Exec::memory_space;

  /// Uses `groups.ep()`, `.etp()` and `.tp_ep()`. Throws `invalid_config` when E is not
  /// divisible by EP or the configuration is inconsistent.
  AllToAllTokenDispatcher(Exec exec, DispatcherConfig cfg, Drop drop, ProcessGroups<Comm>& groups)
      : AllToAllTokenDispatcher(std::move(exec), cfg, drop, groups.ep(), groups.etp(),
                                groups.tp_ep()) {}
  AllToAllTokenDispatcher(DispatcherConfig cfg, Drop drop, ProcessGroups<Comm>& groups)
    requires std::default_initializable<Exec>
      : AllToAllTokenDispatcher(Exec{}, cfg, drop, groups) {}
  AllToAllTokenDispatcher(DispatcherConfig cfg, Drop drop, Comm ep, Comm etp, Comm tp_ep)
    requires std::default_initializable<Exec>
      : AllToAllTokenDispatcher(Exec{}, cfg, drop, std::move(ep), std::move(etp),
                                std::move(tp_ep)) {}
  AllToAllTokenDispatcher(Exec exec, DispatcherConfig cfg, Drop drop, Comm ep, Comm etp, Comm tp_ep)
      : exec_(std::move(exec)),
        cfg_(cfg),
        drop_(drop),
        ep_(std::move(ep)),
        etp_(std::move(etp)),
        tp_ep_(std::move(tp_ep)),
        experts_(exec_) {
    l_ = detail::check_expert_groups(cfg_, ep_, etp_, tp_ep_);
  }

  DispatchMetadata const& metadata() const noexcept { return meta_; }

  /// Per-microbatch saved state (nn/microbatch_stash.hpp).
  void stash(int mb) { stash_.stash(mb, saved()); }
  void restore(int mb) { stash_.restore(mb, saved()); }
  void drop_stashed() { stash_.drop(); }

  /// Applies the drop policy to this rank's routing (capacity on local tokens) and computes the
  /// splits. Collective over `tp_ep` (count all-gather), except in drop-and-pad mode. Copies
  /// E counts (with dedup E + EP) to the host, once.
  DispatchMetadata const& plan(Routing<Real, Space> const& routing) {
    auto const cap = detail::accept_routing(exec_, routing, routing_, cfg_, drop_, workspace_,
                                            "AllToAllDispatcher::plan");
    int const ep = ep_.size(), etp = etp_.size(), me_ep = ep_.rank(), me_etp = etp_.rank();
    auto const L = static_cast<std::size_t>(l_);
    auto const E = static_cast<std::size_t>(cfg_.num_experts);
    auto const T = routing_.num_tokens;
    meta_ = DispatchMetadata{};
    meta_.ep_size = ep;
    meta_.etp_size = etp;
    meta_.num_local_experts = l_;
    meta_.num_tokens = T;
    meta_.capacity = cap ? *cap : -1;
    meta_.padded = Drop::drops && drop_.pad_to_capacity;
    meta_.dedup = cfg_.dedup && !meta_.padded;

    // Sort keys and their counts: entries per expert; with dedup, tokens per destination.
    auto const map = View<Route const, Space>(routing_.map.view(T, cfg_.num_experts));
    auto const keys = sized(keys_, T * cfg_.num_experts);
    ExpertMajorOrderIn<Space>::keys(exec_, routing_, keys);
    auto const dest_keys = sized(dest_keys_, meta_.dedup ? T * ep : 0);
    if (meta_.dedup) ops::destination_keys<Exec, Route>(exec_, map, Route::none, l_, dest_keys);
    detail::PlanCounts<Exec> counts(exec_, {cfg_.num_experts, meta_.dedup ? ep : 0});
    counts.count(0, keys);
    if (meta_.dedup) counts.count(1, dest_keys);
    counts.check_finite(routing, status_keys_);
    counts.to_host("AllToAllDispatcher::plan");  // the one copy to the host
    auto order = ExpertMajorOrderIn<Space>::from_keys(exec_, keys, counts.host(0), T);
    auto const& n = order.tokens_per_expert;
    meta_.num_out = detail::total(n);
    meta_.local_tokens_per_expert = n;
    auto const sources = static_cast<std::size_t>(ep * etp);
    std::vector<std::int64_t> distinct = counts.host(1);  // dedup rows per destination

    if (meta_.dedup) {
      // Rows: (destination EP rank j, token t) with t ascending within j.
      auto const rows = detail::total(distinct);
      auto sorted = exec_.template allocate<std::int64_t>(rows);
      stable_sort_by_key<std::int64_t>(exec_, View<std::int64_t const, Space>(dest_keys), ep,
                                       sorted.view());
      auto tokens = exec_.template allocate<std::int64_t>(rows);
      send_entry_ = exec_.template allocate<std::int64_t>(rows * l_);
      ops::destination_rows<Exec, Route>(exec_, sorted.view(), map, Route::none, l_, tokens.view(),
                                         send_entry_.view());
      send_map_ = RowMapIn<Space>(exec_, std::move(tokens), T);
      meta_.input_splits = distinct;
    } else {
      send_map_ = std::move(order.tokens);
      send_entry_ = std::move(order.entry);
      meta_.input_splits.assign(static_cast<std::size_t>(ep), 0);
      for (std::size_t e = 0; e < E; ++e) meta_.input_splits[e / L] += n[e];
    }

    // NG[t][j][l] and the rows received from each source (t, j).
    auto& ng = meta_.num_global_tokens_per_local_expert;
    ng.assign(sources * L, 0);
    std::vector<std::int64_t> rows_from(sources, 0);  // [t][j]
    if (meta_.padded) {
      std::fill(ng.begin(), ng.end(), meta_.capacity);
      std::fill(rows_from.begin(), rows_from.end(), meta_.capacity * l_);
    } else {
      // One all-gather over tp_ep: [distinct rows per destination (dedup) | n [E]].
      std::size_t const width = (meta_.dedup ? static_cast<std::size_t>(ep) : 0) + E;
      std::vector<std::int64_t> mine;
      if (meta_.dedup) mine = distinct;
      mine.insert(mine.end(), n.begin(), n.end());
      std::vector<std::int64_t> all(width * sources);
      tp_ep_.all_gather(std::span<std::int64_t const>(mine), std::span<std::int64_t>(all));
      for (int t = 0; t < etp; ++t)
        for (int j = 0; j < ep; ++j) {
          auto const src = static_cast<std::size_t>(t + etp * j);  // tp_ep rank of (t, j)
          auto const* row = all.data() + src * width;
          auto const tj = static_cast<std::size_t>(t * ep + j);
          for (std::size_t l = 0; l < L; ++l)
            ng[tj * L + l] = row[(meta_.dedup ? static_cast<std::size_t>(ep) : 0) +
                                 static_cast<std::size_t>(me_ep) * L + l];
          rows_from[tj] =
              meta_.dedup ? row[me_ep]
                          : std::accumulate(ng.begin() + static_cast<std::ptrdiff_t>(tj * L),
                                            ng.begin() + static_cast<std::ptrdiff_t>((tj + 1) * L),
                                            std::int64_t{0});
        }
    }
    meta_.output_splits.assign(static_cast<std::size_t>(ep), 0);
    meta_.output_splits_tp.assign(static_cast<std::size_t>(etp), 0);
    meta_.tokens_per_local_expert.assign(L, 0);
    for (int t = 0; t < etp; ++t)
      for (int j = 0; j < ep; ++j) {
        auto const tj = static_cast<std::size_t>(t * ep + j);
        if (t == me_etp) meta_.output_splits[static_cast<std::size_t>(j)] = rows_from[tj];
        meta_.output_splits_tp[static_cast<std::size_t>(t)] += rows_from[tj];
        for (std::size_t l = 0; l < L; ++l) meta_.tokens_per_local_expert[l] += ng[tj * L + l];
      }
    gathered_rows_ = detail::total(meta_.output_splits_tp);
    if (!meta_.dedup) {
      // Chunk sort (t, j, l) → (l, t, j): Megatron's sort_in over the NG chunks.
      auto const order_in = transpose_order(static_cast<std::int64_t>(sources), l_);
      experts_.set_map(RowMapIn<Space>(exec_, sort_chunks(exec_, ng, order_in), gathered_rows_));
    }
    send_routed_ = exec_.template allocate<std::int64_t>(static_cast<std::int64_t>(send_entry_.size()));
    ops::routed_index<Exec, Route>(exec_, send_entry_.view(), routing_.map.view(), Route::routed,
                                   send_routed_.view());
    return meta_;
  }

  /// Runs `while_in_flight` of `dispatch` and `combine` between the start and the end of their
  /// token all-to-all (the MoE layer's shared-expert overlap).
  static constexpr bool overlaps_work = true;

  /// Moves this rank's tokens `hidden [T, H]` with probabilities `probs [T, E]` (read at the
  /// planned entries) to the experts. Collective over `ep` and `etp`.
  DispatchOutput<Real, Space> dispatch(View<Real const, Space> hidden, View<Real const, Space> probs) {
    return dispatch(hidden, probs, detail::NoWork{});
  }
  /// As `dispatch`, calling `while_in_flight()` once while the token all-to-all is in flight
  /// (started, not yet waited for): work that may call collectives on other groups than `ep`.
  /// On the peer-read path no row is in flight (the exchange is the copy): it runs first.
  template <class Work>
  DispatchOutput<Real, Space> dispatch(View<Real const, Space> hidden, View<Real const, Space> probs,
                                       Work&& while_in_flight) {
    auto const h = cfg_.hidden_size;
    auto const T = routing_.num_tokens;
    MOEFOLD_EXPECTS(hidden.size() == T * h,
                    "AllToAllDispatcher::dispatch: hidden has {} elements, planned T·H = {}·{}",
                    hidden.size(), T, h);
    MOEFOLD_EXPECTS(probs.size() == static_cast<std::int64_t>(routing_.probs.size()),
                    "AllToAllDispatcher::dispatch: probs has {} elements, expected T·E = {}",
                    probs.size(), routing_.probs.size());
    if constexpr (kPeerReads)
      if (by_peer_reads()) {
        while_in_flight();
        return dispatch_by_peer_reads(hidden, probs);
      }
    auto const w = probs_width();
    auto send = experts_.take(static_cast<std::size_t>(send_map_.rows() * h));
    permute<Real>(exec_, send_map_, hidden, send.view(), h);
    auto const n_sent = static_cast<std::int64_t>(send_entry_.size());
    auto send_p = exec_.template allocate<Real>(n_sent);
    ops::gather_or_zero<Exec, Real>(exec_, send_routed_.view(), probs, send_p.view());
    Buffer<std::uint8_t, Space> send_f;
    if (meta_.dedup) {
      send_f = exec_.template allocate<std::uint8_t>(n_sent);
      ops::select_non_negative<Exec, std::uint8_t>(exec_, send_entry_.view(), 1, 0, send_f.view());
    }

    // Token all-to-all over ep (payload bytes recorded as the communicator counts them).
    auto const before = ep_.traffic()[CollectiveKind::all_to_all].bytes_sent;
    auto recv = all_to_all<Real>(send, meta_.input_splits, meta_.output_splits, h, while_in_flight);
    meta_.ep_token_bytes_sent = ep_.traffic()[CollectiveKind::all_to_all].bytes_sent - before;
    experts_.give(std::move(send));
    auto recv_p = all_to_all<Real>(send_p, meta_.input_splits, meta_.output_splits, w);
    Buffer<std::uint8_t, Space> recv_f;
    if (meta_.dedup)
      recv_f = all_to_all<std::uint8_t>(send_f, meta_.input_splits, meta_.output_splits, w);

    // Every ETP rank of my EP rank gets the same rows.
    auto gathered = all_gather_etp<Real>(std::move(recv), h);
    gathered_p_ = all_gather_etp<Real>(std::move(recv_p), w);
    if (meta_.dedup) {
      auto flags = all_gather_etp<std::uint8_t>(std::move(recv_f), w);
      expand(flags.view());
    } else {
      slot_ = exec_.template allocate<std::int64_t>(experts_.rows());
      copy<std::int64_t>(exec_, experts_.map().row_targets(), slot_.view());
    }

    auto expert_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(slot_.size()));
    ops::gather_or_zero<Exec, Real>(exec_, slot_.view(), gathered_p_.view(), expert_probs.view());
    auto out = experts_.to_experts(gathered.view(), h, std::move(expert_probs),
                                   meta_.tokens_per_local_expert);
    experts_.give(std::move(gathered));
    return out;
  }

  /// Scales each expert row by its probability, sums the partial outputs over `etp`, returns
  /// rows to their source ranks and sums each token's rows: `[T, H]`. Collective over `etp`
  /// and `ep`.
  /// `while_in_flight()` runs once while the all-to-all back is in flight (see `dispatch`).
  template <class Work = detail::NoWork>
  Buffer<Real, Space> combine(View<Real const, Space> expert_output, Work&& while_in_flight = {}) {
    auto const h = cfg_.hidden_size;
    if constexpr (kPeerReads)
      if (by_peer_reads()) {
        check_expert_output(static_cast<std::size_t>(expert_output.size()));
        experts_.keep_output(expert_output);
        while_in_flight();
        return combine_kept_by_peer_reads();
      }
    return combine_gathered(experts_.combine(expert_output, gathered_rows_, h, "AllToAllDispatcher"),
                            while_in_flight);
  }

 private:
  /// The collective combine after the expert side's weighted sums `g` [R, H].
  template <class Work>
  Buffer<Real, Space> combine_gathered(Buffer<Real, Space> g, Work& while_in_flight) {
    auto const h = cfg_.hidden_size;
    auto mine = reduce_scatter_etp<Real>(std::move(g), h);
    auto back = all_to_all<Real>(mine, meta_.output_splits, meta_.input_splits, h, while_in_flight);
    experts_.give(std::move(mine));
    auto out = exec_.template allocate<Real>(routing_.num_tokens * h);
    unpermute<Real>(exec_, send_map_, back.view(), out.view(), h);
    experts_.give(std::move(back));
    return out;
  }
  void check_expert_output(std::size_t n) const {
    MOEFOLD_EXPECTS(static_cast<std::int64_t>(n) == experts_.rows() * cfg_.hidden_size,
                    "AllToAllDispatcher::combine: expert output has {} elements, expected N·H = "
                    "{}·{}",
                    n, experts_.rows(), cfg_.hidden_size);
  }

 public:

  /// `combine` of an expert output that the dispatcher keeps for `combine_backward` (no copy;
  /// the buffer is the dispatcher's from here on).
  template <class Work = detail::NoWork>
  Buffer<Real, Space> combine_owned(Buffer<Real, Space>&& expert_output, Work&& while_in_flight = {}) {
    auto const h = cfg_.hidden_size;
    check_expert_output(expert_output.size());
    experts_.keep_output(std::move(expert_output));
    if constexpr (kPeerReads)
      if (by_peer_reads()) {
        while_in_flight();
        return combine_kept_by_peer_reads();
      }
    return combine_gathered(experts_.combine_kept(gathered_rows_, h), while_in_flight);
  }

  /// Backward of `combine`: from `d_output [T, H]`, the gradients of the expert output and of
  /// the expert probabilities (this ETP rank's share: sum over `etp` is the full gradient).
  CombineGrad<Real, Space> combine_backward(View<Real const, Space> d_output) {
    auto const h = cfg_.hidden_size;
    MOEFOLD_EXPECTS(d_output.size() == routing_.num_tokens * h,
                    "AllToAllDispatcher::combine_backward: gradient has {} elements, expected T·H",
                    d_output.size());
    if constexpr (kPeerReads)
      if (by_peer_reads()) return combine_backward_by_peer_reads(d_output);
    auto send = experts_.take(static_cast<std::size_t>(send_map_.rows() * h));
    permute<Real>(exec_, send_map_, d_output, send.view(), h);
    auto recv = all_to_all<Real>(send, meta_.input_splits, meta_.output_splits, h);
    experts_.give(std::move(send));
    auto g = all_gather_etp<Real>(std::move(recv), h);
    auto out = experts_.combine_backward(g.view(), h);
    experts_.give(std::move(g));
    return out;
  }

  /// Backward of `dispatch`: sums expert-input gradients (and ETP partials), returns them to
  /// the source ranks: `d_hidden [T, H]` and `d_probs [T, E]`. Collective over `etp` and `ep`.
  DispatchGrad<Real, Space> dispatch_backward(View<Real const, Space> d_expert_input,
                                              View<Real const, Space> d_expert_probs) {
    auto const h = cfg_.hidden_size;
    if constexpr (kPeerReads)
      if (by_peer_reads()) return dispatch_backward_by_peer_reads(d_expert_input, d_expert_probs);
    auto const w = probs_width();
    auto g = experts_.dispatch_backward(d_expert_input, d_expert_probs, gathered_rows_, h,
                                        "AllToAllDispatcher");
    auto gp = exec_.template allocate<Real>(gathered_rows_ * w);
    ops::fill(exec_, gp.view(), Real(0));
    ops::scatter<Exec, Real>(exec_, slot_.view(), d_expert_probs, gp.view(), /*add=*/true);
    auto mine = reduce_scatter_etp<Real>(std::move(g), h);
    auto mine_p = reduce_scatter_etp<Real>(std::move(gp), w);
    auto back = all_to_all<Real>(mine, meta_.output_splits, meta_.input_splits, h);
    experts_.give(std::move(mine));
    auto back_p = all_to_all<Real>(mine_p, meta_.output_splits, meta_.input_splits, w);
    DispatchGrad<Real, Space> out;
    out.d_hidden = exec_.template allocate<Real>(routing_.num_tokens * h);
    unpermute<Real>(exec_, send_map_, back.view(), out.d_hidden.view(), h);
    experts_.give(std::move(back));
    out.d_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(routing_.probs.size()));
    ops::fill(exec_, out.d_probs.view(), Real(0));
    ops::scatter<Exec, Real>(exec_, send_routed_.view(), back_p.view(), out.d_probs.view(),
                             /*add=*/false);
    return out;
  }

  /// Whether this dispatcher moves rows by peer reads (see `DispatcherConfig::peer_reads`).
  bool moves_by_peer_reads() const noexcept { return by_peer_reads(); }

  /// Returns a buffer this dispatcher handed out (an expert input, a combine output) for reuse
  /// by later calls: a warm step then allocates none of its large buffers.
  void give_back(Buffer<Real, Space>&& b) { experts_.give(std::move(b)); }

 private:
  /// Whether rows move by peer reads (`DispatcherConfig::peer_reads`; host memory, a
  /// communicator with peer reads, ETP = 1).
  static constexpr bool kPeerReads = Space::host_accessible && has_peer_reads_v<Comm>;
  bool by_peer_reads() const noexcept { return kPeerReads && cfg_.peer_reads && etp_.size() == 1; }

  /// Dedup: expands each gathered row to the local experts its flags [R·L] name, in (local
  /// expert, gathered row) order; sets the expert rows' map and `slot_`.
  void expand(View<std::uint8_t const, Space> flags) {
    auto const rows = meta_.num_expert_rows();
    auto const keys = sized(expand_keys_, gathered_rows_ * l_);
    ops::expand_keys<Exec>(exec_, flags, l_, keys);
    auto sorted = exec_.template allocate<std::int64_t>(rows);
    stable_sort_by_key<std::int64_t>(exec_, View<std::int64_t const, Space>(keys), l_,
                                     sorted.view());
    auto src = exec_.template allocate<std::int64_t>(rows);
    slot_ = exec_.template allocate<std::int64_t>(rows);
    ops::expand_rows<Exec>(exec_, sorted.view(), gathered_rows_, l_, src.view(), slot_.view());
    experts_.set_map(RowMapIn<Space>(exec_, std::move(src), gathered_rows_));
  }

  static std::span<std::int64_t const> host(View<std::int64_t const, Space> v) {
    return {v.data(), static_cast<std::size_t>(v.size())};
  }

  /// `dispatch` by peer reads: each rank publishes where its rows are; the expert side copies
  /// every row once, from the owner's `hidden` into its place in the expert input.
  DispatchOutput<Real, Space> dispatch_by_peer_reads(View<Real const, Space> hidden,
                                                     View<Real const, Space> probs) {
    auto const h = cfg_.hidden_size;
    auto const w = probs_width();
    // This rank's probability per sent slot: what the experts' side weights the rows with.
    sized(send_w_, static_cast<std::int64_t>(send_routed_.size()));
    ops::gather_or_zero<Exec, Real>(exec_, send_routed_.view(), probs, send_w_.view());
    peer_.set_forward(host(send_map_.row_targets()), host(send_routed_.view()), meta_.input_splits,
                      w);
    meta_.ep_token_bytes_sent = 0;
    for (int q = 0; q < ep_.size(); ++q)
      if (q != ep_.rank())
        meta_.ep_token_bytes_sent += meta_.input_splits[static_cast<std::size_t>(q)] * h *
                                     static_cast<std::int64_t>(sizeof(Real));
    Buffer<Real, Space> input, p;
    peer_.forward(ep_, hidden.data(), probs.data(), h, meta_.output_splits, [&](auto const& peers) {
      if (meta_.dedup) {
        auto flags = exec_.template allocate<std::uint8_t>(gathered_rows_ * l_);
        for (std::int64_t g = 0; g < gathered_rows_; ++g)
          for (std::int64_t l = 0; l < l_; ++l) flags[static_cast<std::size_t>(g * l_ + l)] = peers.carries(g, l);
        expand(flags.view());
      } else {
        sized(slot_, experts_.rows());
        copy<std::int64_t>(exec_, experts_.map().row_targets(), slot_.view());
      }
      auto const rows = experts_.rows();
      auto const* target = experts_.map().row_targets().data();
      ptrs_.resize(static_cast<std::size_t>(rows));
      p = exec_.template allocate<Real>(rows);
      for (std::int64_t n = 0; n < rows; ++n) {
        auto const s = slot_[static_cast<std::size_t>(n)];
        ptrs_[static_cast<std::size_t>(n)] = peers.row(target[n]);
        p[static_cast<std::size_t>(n)] = peers.prob(s / w, s % w);
      }
      input = experts_.take_dirty(static_cast<std::size_t>(rows * h));
      ops::gather_row_ptrs<Exec, Real>(exec_, ptrs_.data(), {}, input.view().reshaped(rows, h));
    });
    peer_.set_back(host(slot_.view()), meta_.output_splits);
    return experts_.adopt(std::move(input), std::move(p), meta_.tokens_per_local_expert);
  }

  /// out [T, H] = each token's sent rows, read from the peers' `rows` through the back
  /// descriptor: Σ over its sent rows of Σ over their slots of weight · row (`weights` [N·w],
  /// empty: 1), in the order of the generic path's two sums.
  template <class Peers>
  void sum_sent_rows(Peers const& peers, View<Real const, Space> weights, View<Real, Space> out) {
    auto const w = probs_width();
    auto const n = send_map_.rows();
    ptrs_.resize(static_cast<std::size_t>(n * w));
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t l = 0; l < w; ++l)
        ptrs_[static_cast<std::size_t>(i * w + l)] = peers.expert_row_ptr(i, l);
    ops::gather_sum_row_groups<Exec, Real>(exec_, send_map_.offsets(), send_map_.target_rows(),
                                           ptrs_.data(), w, weights,
                                           out.reshaped(routing_.num_tokens, cfg_.hidden_size));
  }

  /// `combine` by peer reads of the kept expert output: each token's owner sums its rows
  /// straight from the experts' output on the peers, weighted by the probabilities it sent.
  Buffer<Real, Space> combine_kept_by_peer_reads() {
    auto const h = cfg_.hidden_size;
    auto out = experts_.take_dirty(static_cast<std::size_t>(routing_.num_tokens * h));
    peer_.back(ep_, experts_.saved_output().data(), nullptr, h, meta_.input_splits,
               [&](auto const& peers) { sum_sent_rows(peers, send_w_.view(), out.view()); });
    return out;
  }

  /// `combine_backward` by peer reads: the expert side reads each row's gradient from its
  /// owner's `d_output`.
  CombineGrad<Real, Space> combine_backward_by_peer_reads(View<Real const, Space> d_output) {
    auto const h = cfg_.hidden_size;
    auto const rows = experts_.rows();
    CombineGrad<Real, Space> out;
    out.d_expert_output = exec_.template allocate<Real>(rows * h);
    out.d_expert_probs = exec_.template allocate<Real>(rows);
    peer_.forward(ep_, d_output.data(), nullptr, h, meta_.output_splits, [&](auto const& peers) {
      auto const* target = experts_.map().row_targets().data();
      ptrs_.resize(static_cast<std::size_t>(rows));
      for (std::int64_t n = 0; n < rows; ++n) ptrs_[static_cast<std::size_t>(n)] = peers.row(target[n]);
      ops::gather_row_ptrs<Exec, Real>(exec_, ptrs_.data(), experts_.probs(),
                                       out.d_expert_output.view().reshaped(rows, h));
      ops::row_dot_ptrs<Exec, Real>(exec_, ptrs_.data(), experts_.saved_output().reshaped(rows, h),
                                    out.d_expert_probs.view());
    });
    return out;
  }

  /// `dispatch_backward` by peer reads: each token's owner sums the expert-input gradients of
  /// its rows from the peers and reads back the probabilities' gradients.
  DispatchGrad<Real, Space> dispatch_backward_by_peer_reads(View<Real const, Space> d_expert_input,
                                                            View<Real const, Space> d_expert_probs) {
    auto const h = cfg_.hidden_size;
    auto const w = probs_width();
    auto const rows = experts_.rows();
    MOEFOLD_EXPECTS(d_expert_input.size() == rows * h && d_expert_probs.size() == rows,
                    "AllToAllDispatcher::dispatch_backward: gradients of {} and {} elements for N "
                    "= {} rows of H = {}",
                    d_expert_input.size(), d_expert_probs.size(), rows, h);
    DispatchGrad<Real, Space> out;
    out.d_hidden = exec_.template allocate<Real>(routing_.num_tokens * h);
    out.d_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(routing_.probs.size()));
    ops::fill(exec_, out.d_probs.view(), Real(0));
    peer_.back(ep_, d_expert_input.data(), d_expert_probs.data(), h, meta_.input_splits,
               [&](auto const& peers) {
                 sum_sent_rows(peers, {}, out.d_hidden.view());
                 auto const n = send_map_.rows();
                 for (std::int64_t i = 0; i < n; ++i)
                   for (std::int64_t l = 0; l < w; ++l) {
                     auto const e = send_routed_[static_cast<std::size_t>(i * w + l)];
                     if (e < 0 || peers.expert_row(i, l) < 0) continue;
                     // As the generic path's scatter-add onto zeros (−0 becomes +0).
                     out.d_probs[static_cast<std::size_t>(e)] =
                         narrow<Real>(widen(Real(0)) + widen(peers.expert_prob(i, l)));
                   }
               });
    return out;
  }

  /// Probabilities per moved row: one (Megatron), or L (dedup: one per local expert).
  std::int64_t probs_width() const { return meta_.dedup ? l_ : 1; }

  /// `b` as n elements (reallocated only when its size changes).
  template <class U>
  View<U, Space> sized(Buffer<U, Space>& b, std::int64_t n) {
    if (static_cast<std::int64_t>(b.size()) != n) b = exec_.template allocate<U>(n);
    return b.view();
  }

  /// AllToAll-V over ep of rows of `width`; `in_flight()` runs between its start and its end.
  template <class U, class Work = detail::NoWork>
  Buffer<U, Space> all_to_all(Buffer<U, Space> const& send, std::span<std::int64_t const> send_rows,
                              std::span<std::int64_t const> recv_rows, std::int64_t width,
                              Work&& in_flight = {}) {
    auto const sc = detail::scaled(send_rows, width), rc = detail::scaled(recv_rows, width);
    auto const n = static_cast<std::size_t>(detail::total(rc));
    Buffer<U, Space> recv;
    if constexpr (std::is_same_v<U, Real>) recv = experts_.take(n);
    else recv = exec_.template allocate<U>(static_cast<std::int64_t>(n));
    bool ran = false;
    detail::collective<Exec, Comm, U>(
        exec_, ep_, send.view(), recv.view(),
        [&](std::span<U const> in, std::span<U> out) {
          auto const scs = std::span<std::int64_t const>(sc), rcs = std::span<std::int64_t const>(rc);
          if constexpr (std::is_same_v<std::remove_cvref_t<Work>, detail::NoWork>) {
            ep_.all_to_all_v(in, scs, out, rcs);
          } else {
            auto started = ep_.start_all_to_all_v(in, scs, out, rcs);
            ran = true;
            in_flight();
            started.wait();
          }
        },
        "all-to-all over ep");
    if (!ran) in_flight();  // no collective was in flight (one rank's device copy): run it now
    return recv;
  }
  /// AllGather-V over etp of each ETP rank's received rows (identity when ETP = 1).
  template <class U>
  Buffer<U, Space> all_gather_etp(Buffer<U, Space> mine, std::int64_t width) {
    if (etp_.size() == 1) return mine;
    auto const c = detail::scaled(meta_.output_splits_tp, width);
    auto out = exec_.template allocate<U>(detail::total(c));
    detail::collective<Exec, Comm, U>(
        exec_, etp_, mine.view(), out.view(),
        [&](std::span<U const> in, std::span<U> o) {
          etp_.all_gather_v(in, o, std::span<std::int64_t const>(c));
        },
        "all-gather over etp");
    if constexpr (std::is_same_v<U, Real>) experts_.give(std::move(mine));
    return out;
  }
  /// ReduceScatter-V (sum) over etp back to each ETP rank's rows (identity when ETP = 1).
  template <class U>
  Buffer<U, Space> reduce_scatter_etp(Buffer<U, Space> all, std::int64_t width) {
    if (etp_.size() == 1) return all;
    auto const c = detail::scaled(meta_.output_splits_tp, width);
    auto out = exec_.template allocate<U>(c[static_cast<std::size_t>(etp_.rank())]);
    detail::collective<Exec, Comm, U>(
        exec_, etp_, all.view(), out.view(),
        [&](std::span<U const> in, std::span<U> o) {
          etp_.reduce_scatter_v(in, o, std::span<std::int64_t const>(c), ReduceOp::sum);
        },
        "reduce-scatter over etp");
    return out;
  }

  /// The plan and what combine and the backwards read.
  auto saved() {
    return std::tuple_cat(std::tie(meta_, routing_, send_map_, send_entry_, gathered_rows_,
                                   send_routed_, slot_, gathered_p_, send_w_, peer_),
                          experts_.saved());
  }

  Exec exec_;
  DispatcherConfig cfg_;
  Drop drop_;
  Comm ep_, etp_, tp_ep_;
  int l_ = 1;
  DispatchMetadata meta_;
  Routing<Real, Space> routing_;            // after the drop policy
  RowMapIn<Space> send_map_;                // sent rows → tokens
  Buffer<std::int64_t, Space> send_entry_;  // routing entry per sent row (× L with dedup; -1: none)
  std::int64_t gathered_rows_ = 0;          // R: rows after the ETP all-gather
  Buffer<std::int64_t, Space> send_routed_;  // routing entry per sent probability, −1: not routed
  detail::ExpertRows<Exec, Real> experts_;  // expert rows ↔ gathered rows
  Buffer<std::int64_t, Space> slot_;        // expert row → probability slot of the gathered rows
  Buffer<Real, Space> gathered_p_;
  Buffer<Real, Space> send_w_;         // peer reads: this rank's probability per sent slot
  detail::PeerRows<Real> peer_;        // peer reads: the descriptors
  std::vector<Real const*> ptrs_;      // peer reads: a row pointer per moved row (reused)
  // Per-plan temporaries, reused: sort keys and the drop policy's rankings.
  Buffer<std::int64_t, Space> keys_, dest_keys_, expand_keys_, status_keys_, workspace_;
  MicrobatchStash stash_;
};

/// Policy tag: `AllToAllDispatcher<Drop>::dispatcher<Exec, Comm, Real>` is the dispatcher type.
template <DropPolicy Drop = Dropless>
struct AllToAllDispatcher {
  using drop_policy = Drop;
  template <class Exec, class Comm, class Real = float>
  using dispatcher = AllToAllTokenDispatcher<Exec, Drop, Comm, Real>;
};

namespace cpu {
template <DropPolicy Drop, Communicator Comm, class Real = float>
using AllToAllTokenDispatcher = moefold::AllToAllTokenDispatcher<Cpu, Drop, Comm, Real>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
