#pragma once
/// \file
/// `AllToAllTokenDispatcher` (policy tag `AllToAllDispatcher<Drop>`): Megatron's
/// `MoEAlltoAllTokenDispatcher` (spec §2.4) — token counts all-gathered over `tp_ep`, AllToAll-V
/// over `ep`, AllGather-V over `etp` when ETP > 1, chunk sort by local expert; combine in
/// reverse (ReduceScatter-V over `etp`, AllToAll-V back, unpermute). With `dedup`, a token
/// crosses to each destination EP rank once and is expanded there. See docs/dispatcher.md.

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/process_groups.hpp"
#include "moefold/moe/capacity.hpp"
#include "moefold/moe/detail/expert_rows.hpp"
#include "moefold/moe/permutation.hpp"
#include "moefold/moe/token_dispatcher.hpp"
#include "moefold/ops/permute.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
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
/// copy in `kept` and applies the drop policy to it (capacity on this rank's tokens). Returns
/// the capacity per expert, or nothing when dropless.
template <class Drop, class Real>
std::optional<std::int64_t> accept_routing(Routing<Real> const& routing, Routing<Real>& kept,
                                           DispatcherConfig const& cfg, Drop const& drop,
                                           char const* who) {
  routing.check_shape(who);
  MOEFOLD_EXPECTS(routing.num_experts == cfg.num_experts,
                  "{}: routing over {} experts, configured for {}", who, routing.num_experts,
                  cfg.num_experts);
  kept = routing;
  return apply_capacity(drop, kept, cfg.moe_router_topk);
}
}  // namespace detail

/// The all-to-all token dispatcher over the expert groups of one rank.
template <HostInstance Exec, DropPolicy Drop, Communicator Comm, class Real = float>
class AllToAllTokenDispatcher {
 public:
  using real_type = Real;
  using exec_type = Exec;

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

  /// Applies the drop policy to this rank's routing (capacity on local tokens) and computes the
  /// splits. Collective over `tp_ep` (count all-gather), except in drop-and-pad mode.
  DispatchMetadata const& plan(Routing<Real> const& routing) {
    auto const cap =
        detail::accept_routing(routing, routing_, cfg_, drop_, "AllToAllDispatcher::plan");
    int const ep = ep_.size(), etp = etp_.size(), me_ep = ep_.rank(), me_etp = etp_.rank();
    auto const L = static_cast<std::size_t>(l_);
    auto const E = static_cast<std::size_t>(cfg_.num_experts);
    meta_ = DispatchMetadata{};
    meta_.ep_size = ep;
    meta_.etp_size = etp;
    meta_.num_local_experts = l_;
    meta_.num_tokens = routing_.num_tokens;
    meta_.capacity = cap ? *cap : -1;
    meta_.padded = Drop::drops && drop_.pad_to_capacity;
    meta_.dedup = cfg_.dedup && !meta_.padded;

    auto const order = ExpertMajorOrder::of(exec_, routing_);
    meta_.num_out = detail::total(order.tokens_per_expert);
    meta_.local_tokens_per_expert = order.tokens_per_expert;
    auto const& n = order.tokens_per_expert;
    auto const sources = static_cast<std::size_t>(ep * etp);
    std::vector<std::int64_t> distinct(static_cast<std::size_t>(ep), 0);  // dedup rows per dest

    if (meta_.dedup) {
      // Rows: (destination EP rank j, token t) with t ascending within j.
      std::vector<std::int64_t> tokens;
      send_entry_.clear();
      for (int j = 0; j < ep; ++j)
        for (std::int64_t t = 0; t < routing_.num_tokens; ++t) {
          auto const base = static_cast<std::size_t>(t) * E + static_cast<std::size_t>(j) * L;
          bool any = false;
          for (std::size_t l = 0; l < L; ++l) any = any || routing_.map[base + l] != Route::none;
          if (!any) continue;
          tokens.push_back(t);
          ++distinct[static_cast<std::size_t>(j)];
          for (std::size_t l = 0; l < L; ++l)
            send_entry_.push_back(
                routing_.map[base + l] != Route::none ? static_cast<std::int64_t>(base + l) : -1);
        }
      send_map_ = RowMap(exec_, std::move(tokens), routing_.num_tokens);
      meta_.input_splits = distinct;
    } else {
      send_map_ = order.tokens;
      send_entry_ = order.entry;
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
      auto src = sort_chunks(ng, transpose_order(static_cast<std::int64_t>(sources), l_));
      experts_.set_map(RowMap(exec_, std::move(src), gathered_rows_));
    }
    send_routed_ = exec_.template allocate<std::int64_t>(static_cast<std::int64_t>(send_entry_.size()));
    ops::routed_index<Exec, Route>(exec_, View<std::int64_t const>(send_entry_),
                                   View<Route const>(routing_.map), Route::routed,
                                   send_routed_.view());
    return meta_;
  }

  /// Moves this rank's tokens `hidden [T, H]` with probabilities `probs [T, E]` (read at the
  /// planned entries) to the experts. Collective over `ep` and `etp`.
  DispatchOutput<Real> dispatch(View<Real const> hidden, View<Real const> probs) {
    auto const h = cfg_.hidden_size;
    auto const T = routing_.num_tokens;
    MOEFOLD_EXPECTS(hidden.size() == T * h,
                    "AllToAllDispatcher::dispatch: hidden has {} elements, planned T·H = {}·{}",
                    hidden.size(), T, h);
    MOEFOLD_EXPECTS(probs.size() == static_cast<std::int64_t>(routing_.probs.size()),
                    "AllToAllDispatcher::dispatch: probs has {} elements, expected T·E = {}",
                    probs.size(), routing_.probs.size());
    auto const w = probs_width();
    Buffer<Real> send = experts_.pool().take(static_cast<std::size_t>(send_map_.rows() * h));
    permute<Real>(exec_, send_map_, hidden, send, h);
    auto const n_sent = static_cast<std::int64_t>(send_entry_.size());
    Buffer<Real> send_p = exec_.template allocate<Real>(n_sent);
    ops::gather_or_zero<Exec, Real>(exec_, send_routed_.view(), probs, send_p.view());
    std::vector<std::uint8_t> send_f(meta_.dedup ? send_entry_.size() : 0);
    if (meta_.dedup)
      for (std::size_t i = 0; i < send_entry_.size(); ++i) send_f[i] = send_entry_[i] >= 0 ? 1 : 0;

    // Token all-to-all over ep (payload bytes recorded as the communicator counts them).
    auto const before = ep_.traffic()[CollectiveKind::all_to_all].bytes_sent;
    auto recv = all_to_all<Real>(send, meta_.input_splits, meta_.output_splits, h);
    meta_.ep_token_bytes_sent = ep_.traffic()[CollectiveKind::all_to_all].bytes_sent - before;
    experts_.pool().give(std::move(send));
    auto recv_p = all_to_all<Real>(send_p, meta_.input_splits, meta_.output_splits, w);
    Buffer<std::uint8_t> recv_f;
    if (meta_.dedup)
      recv_f = all_to_all<std::uint8_t>(send_f, meta_.input_splits, meta_.output_splits, w);

    // Every ETP rank of my EP rank gets the same rows.
    auto gathered = all_gather_etp<Real>(std::move(recv), h);
    gathered_p_ = all_gather_etp<Real>(std::move(recv_p), w);
    if (meta_.dedup) {
      auto flags = all_gather_etp<std::uint8_t>(std::move(recv_f), w);
      // Expand each gathered row to its local experts: (l, then gathered row) order.
      std::vector<std::int64_t> src;
      slot_.clear();
      auto const L = static_cast<std::size_t>(l_);
      for (std::size_t l = 0; l < L; ++l)
        for (std::int64_t r = 0; r < gathered_rows_; ++r)
          if (flags[static_cast<std::size_t>(r) * L + l]) {
            src.push_back(r);
            slot_.push_back(r * l_ + static_cast<std::int64_t>(l));
          }
      MOEFOLD_EXPECTS(static_cast<std::int64_t>(src.size()) == meta_.num_expert_rows(),
                      "AllToAllDispatcher: received {} expert rows, planned {}", src.size(),
                      meta_.num_expert_rows());
      experts_.set_map(RowMap(exec_, std::move(src), gathered_rows_));
    } else {
      slot_.assign(experts_.map().row_targets().begin(), experts_.map().row_targets().end());
    }

    Buffer<Real> expert_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(slot_.size()));
    ops::gather_or_zero<Exec, Real>(exec_, View<std::int64_t const>(slot_), gathered_p_.view(),
                                    expert_probs.view());
    auto out = experts_.to_experts(gathered, h, std::move(expert_probs), meta_.tokens_per_local_expert);
    experts_.pool().give(std::move(gathered));
    return out;
  }

  /// Scales each expert row by its probability, sums the partial outputs over `etp`, returns
  /// rows to their source ranks and sums each token's rows: `[T, H]`. Collective over `etp`
  /// and `ep`.
  Buffer<Real> combine(View<Real const> expert_output) {
    auto const h = cfg_.hidden_size;
    auto g = experts_.combine(expert_output, gathered_rows_, h, "AllToAllDispatcher");
    auto mine = reduce_scatter_etp<Real>(std::move(g), h);
    auto back = all_to_all<Real>(mine, meta_.output_splits, meta_.input_splits, h);
    experts_.pool().give(std::move(mine));
    Buffer<Real> out = exec_.template allocate<Real>(routing_.num_tokens * h);
    unpermute<Real>(exec_, send_map_, back, out, h);
    experts_.pool().give(std::move(back));
    return out;
  }

  /// Backward of `combine`: from `d_output [T, H]`, the gradients of the expert output and of
  /// the expert probabilities (this ETP rank's share: sum over `etp` is the full gradient).
  CombineGrad<Real> combine_backward(View<Real const> d_output) {
    auto const h = cfg_.hidden_size;
    MOEFOLD_EXPECTS(d_output.size() == routing_.num_tokens * h,
                    "AllToAllDispatcher::combine_backward: gradient has {} elements, expected T·H",
                    d_output.size());
    Buffer<Real> send = experts_.pool().take(static_cast<std::size_t>(send_map_.rows() * h));
    permute<Real>(exec_, send_map_, d_output, send, h);
    auto recv = all_to_all<Real>(send, meta_.input_splits, meta_.output_splits, h);
    experts_.pool().give(std::move(send));
    auto g = all_gather_etp<Real>(std::move(recv), h);
    auto out = experts_.combine_backward(g, h);
    experts_.pool().give(std::move(g));
    return out;
  }

  /// Backward of `dispatch`: sums expert-input gradients (and ETP partials), returns them to
  /// the source ranks: `d_hidden [T, H]` and `d_probs [T, E]`. Collective over `etp` and `ep`.
  DispatchGrad<Real> dispatch_backward(View<Real const> d_expert_input,
                                       View<Real const> d_expert_probs) {
    auto const h = cfg_.hidden_size;
    auto const w = probs_width();
    auto g = experts_.dispatch_backward(d_expert_input, d_expert_probs, gathered_rows_, h,
                                        "AllToAllDispatcher");
    Buffer<Real> gp = exec_.template allocate<Real>(gathered_rows_ * w);
    ops::scatter<Exec, Real>(exec_, View<std::int64_t const>(slot_), d_expert_probs, gp.view(),
                             /*add=*/true);
    auto mine = reduce_scatter_etp<Real>(std::move(g), h);
    auto mine_p = reduce_scatter_etp<Real>(std::move(gp), w);
    auto back = all_to_all<Real>(mine, meta_.output_splits, meta_.input_splits, h);
    experts_.pool().give(std::move(mine));
    auto back_p = all_to_all<Real>(mine_p, meta_.output_splits, meta_.input_splits, w);
    DispatchGrad<Real> out;
    out.d_hidden = exec_.template allocate<Real>(routing_.num_tokens * h);
    unpermute<Real>(exec_, send_map_, back, out.d_hidden, h);
    experts_.pool().give(std::move(back));
    out.d_probs = exec_.template allocate<Real>(static_cast<std::int64_t>(routing_.probs.size()));
    ops::scatter<Exec, Real>(exec_, send_routed_.view(), back_p.view(), out.d_probs.view(),
                             /*add=*/false);
    return out;
  }

 private:
  /// Probabilities per moved row: one (Megatron), or L (dedup: one per local expert).
  std::int64_t probs_width() const { return meta_.dedup ? l_ : 1; }

  template <class U>
  Buffer<U> all_to_all(std::span<U const> send, std::span<std::int64_t const> send_rows,
                       std::span<std::int64_t const> recv_rows, std::int64_t width) {
    auto const sc = detail::scaled(send_rows, width), rc = detail::scaled(recv_rows, width);
    auto const n = static_cast<std::size_t>(detail::total(rc));
    Buffer<U> recv;
    if constexpr (std::is_same_v<U, Real>) recv = experts_.pool().take(n);
    else recv = Buffer<U>(static_cast<std::int64_t>(n));
    ep_.all_to_all_v(send, std::span<std::int64_t const>(sc), std::span<U>(recv),
                     std::span<std::int64_t const>(rc));
    return recv;
  }
  template <class U>
  Buffer<U> all_to_all(Buffer<U> const& send, std::span<std::int64_t const> s,
                       std::span<std::int64_t const> r, std::int64_t width) {
    return all_to_all<U>(std::span<U const>(send.data(), send.size()), s, r, width);
  }
  template <class U>
  Buffer<U> all_to_all(std::vector<U> const& send, std::span<std::int64_t const> s,
                       std::span<std::int64_t const> r, std::int64_t width) {
    return all_to_all<U>(std::span<U const>(send), s, r, width);
  }
  /// AllGather-V over etp of each ETP rank's received rows (identity when ETP = 1).
  template <class U>
  Buffer<U> all_gather_etp(Buffer<U> mine, std::int64_t width) {
    if (etp_.size() == 1) return mine;
    auto const c = detail::scaled(meta_.output_splits_tp, width);
    Buffer<U> out(detail::total(c));
    etp_.all_gather_v(std::span<U const>(mine), std::span<U>(out),
                      std::span<std::int64_t const>(c));
    if constexpr (std::is_same_v<U, Real>) experts_.pool().give(std::move(mine));
    return out;
  }
  /// ReduceScatter-V (sum) over etp back to each ETP rank's rows (identity when ETP = 1).
  template <class U>
  Buffer<U> reduce_scatter_etp(Buffer<U> all, std::int64_t width) {
    if (etp_.size() == 1) return all;
    auto const c = detail::scaled(meta_.output_splits_tp, width);
    Buffer<U> out(c[static_cast<std::size_t>(etp_.rank())]);
    etp_.reduce_scatter_v(std::span<U const>(all), std::span<U>(out),
                          std::span<std::int64_t const>(c), ReduceOp::sum);
    return out;
  }

  Exec exec_;
  DispatcherConfig cfg_;
  Drop drop_;
  Comm ep_, etp_, tp_ep_;
  int l_ = 1;
  DispatchMetadata meta_;
  Routing<Real> routing_;                 // after the drop policy
  RowMap send_map_;                       // sent rows → tokens
  std::vector<std::int64_t> send_entry_;  // routing entry per sent row (× L with dedup; -1: none)
  std::int64_t gathered_rows_ = 0;        // R: rows after the ETP all-gather
  Buffer<std::int64_t> send_routed_;     // routing entry per sent probability, −1: not routed
  detail::ExpertRows<Exec, Real> experts_;  // expert rows ↔ gathered rows
  std::vector<std::int64_t> slot_;        // expert row → probability slot of the gathered rows
  Buffer<Real> gathered_p_;
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
