#pragma once
/// \file
/// The zero-copy moves of the all-to-all dispatcher on a communicator whose ranks read their
/// peers' buffers in place (`has_peer_reads_v`: the in-process world). Instead of rows, each
/// rank publishes through `exchange_view` a small descriptor per peer — where its rows are and
/// which of them the peer needs — and the peer copies the rows straight from the owner's buffer
/// into their final place: the expert-major expert input (dispatch), or each token's sum
/// (combine). Row pointers travel as integers: the ranks share one address space, and
/// `exchange_view` keeps every rank inside the call (its buffers alive) until all have read.
///
/// - forward descriptor (owner → expert side; dispatch, combine_backward), per destination q:
///   [rows, probs, the token of each row sent to q (n_q), its w routing entries (n_q·w, −1: none)];
/// - back descriptor (expert side → owner; combine, dispatch_backward), per source j:
///   [rows, probs, the expert row of each (row, slot) j sent (n_j·w, −1: none)].
///
/// w is the number of probabilities per moved row: 1 (Megatron), or L (dedup).

#include <algorithm>
#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace detail {

template <class Real>
class PeerRows {
 public:
  /// The rows and probabilities one peer published, as this rank reads them.
  struct Block {
    Real const* rows = nullptr;
    Real const* probs = nullptr;
    std::int64_t const* index = nullptr;  // tokens (forward) or expert rows (back)
    std::int64_t const* slots = nullptr;  // forward: routing entries per row, w each
  };
  /// What a call's `fn` reads: the peers' blocks by the rows this rank sees in order.
  class Peers {
   public:
    /// Forward: gathered row g's source row on its owner. Back: sent row i's slot l.
    Real const* row(std::int64_t g) const {
      auto const [b, r] = at(g);
      return b.rows + b.index[r] * h_;
    }
    /// Forward: the probability of slot (g, l) (0 where none); whether the row carries slot l.
    Real prob(std::int64_t g, std::int64_t l) const {
      auto const [b, r] = at(g);
      auto const e = b.slots[r * w_ + l];
      return e >= 0 ? b.probs[e] : Real(0);
    }
    bool carries(std::int64_t g, std::int64_t l) const {
      auto const [b, r] = at(g);
      return b.slots[r * w_ + l] >= 0;
    }
    /// Back: the peer's expert row of sent row i, slot l (−1: none), its row and probability.
    std::int64_t expert_row(std::int64_t i, std::int64_t l) const {
      auto const [b, r] = at(i);
      return b.index[r * w_ + l];
    }
    Real const* expert_row_ptr(std::int64_t i, std::int64_t l) const {
      auto const [b, r] = at(i);
      auto const n = b.index[r * w_ + l];
      return n >= 0 ? b.rows + n * h_ : nullptr;
    }
    Real expert_prob(std::int64_t i, std::int64_t l) const {
      auto const [b, r] = at(i);
      return b.probs[b.index[r * w_ + l]];
    }

   private:
    friend class PeerRows;
    std::pair<Block const&, std::int64_t> at(std::int64_t g) const {
      auto const j = static_cast<std::size_t>(
          std::upper_bound(start_.begin(), start_.end(), g) - start_.begin() - 1);
      return {blocks_[j], g - start_[j]};
    }
    std::vector<Block> blocks_;
    std::vector<std::int64_t> start_;  // first row of each peer
    std::int64_t w_ = 1, h_ = 0;
  };

  /// Owner side, per plan: the forward descriptor of the sent rows (`tokens [N]`, destination
  /// major, `splits[q]` rows to q; `entries [N·w]` routing entries, −1: none).
  void set_forward(std::span<std::int64_t const> tokens, std::span<std::int64_t const> entries,
                   std::span<std::int64_t const> splits, std::int64_t w) {
    w_ = w;
    fwd_.clear();
    fwd_counts_.clear();
    std::size_t at = 0;
    for (auto const n : splits) {
      auto const u = static_cast<std::size_t>(n);
      fwd_counts_.push_back(2 + n * (1 + w));
      fwd_.push_back(0);
      fwd_.push_back(0);
      fwd_.insert(fwd_.end(), tokens.begin() + static_cast<std::ptrdiff_t>(at),
                  tokens.begin() + static_cast<std::ptrdiff_t>(at + u));
      fwd_.insert(fwd_.end(), entries.begin() + static_cast<std::ptrdiff_t>(at * w),
                  entries.begin() + static_cast<std::ptrdiff_t>((at + u) * w));
      at += u;
    }
  }
  /// Expert side, per dispatch: the back descriptor from each expert row's slot (`slot [N]`
  /// into the G·w slots of the received rows, `splits[j]` rows from source j).
  void set_back(std::span<std::int64_t const> slot, std::span<std::int64_t const> splits) {
    std::int64_t g = 0;
    for (auto const n : splits) g += n;
    back_index_.assign(static_cast<std::size_t>(g * w_), -1);
    for (std::size_t n = 0; n < slot.size(); ++n)
      back_index_[static_cast<std::size_t>(slot[n])] = static_cast<std::int64_t>(n);
    back_.clear();
    back_counts_.clear();
    std::size_t at = 0;
    for (auto const n : splits) {
      auto const u = static_cast<std::size_t>(n * w_);
      back_counts_.push_back(2 + n * w_);
      back_.push_back(0);
      back_.push_back(0);
      back_.insert(back_.end(), back_index_.begin() + static_cast<std::ptrdiff_t>(at),
                   back_index_.begin() + static_cast<std::ptrdiff_t>(at + u));
      at += u;
    }
  }

  /// Publishes `rows`/`probs` with the forward descriptor and calls `fn(peers)` with what the
  /// peers sent this rank (`recv[j]` rows from j). Collective over `ep`.
  template <class Comm, class Fn>
  void forward(Comm& ep, Real const* rows, Real const* probs, std::int64_t h,
               std::span<std::int64_t const> recv, Fn&& fn) {
    exchange(ep, fwd_, fwd_counts_, rows, probs, h, recv, [&](std::int64_t n) {
      return 2 + n * (1 + w_);
    }, /*forward=*/true, fn);
  }
  /// Publishes `rows`/`probs` with the back descriptor and calls `fn(peers)` with what the
  /// peers return for this rank's sent rows (`sent[q]` rows to q). Collective over `ep`.
  template <class Comm, class Fn>
  void back(Comm& ep, Real const* rows, Real const* probs, std::int64_t h,
            std::span<std::int64_t const> sent, Fn&& fn) {
    exchange(ep, back_, back_counts_, rows, probs, h, sent, [&](std::int64_t n) {
      return 2 + n * w_;
    }, /*forward=*/false, fn);
  }

 private:
  static std::int64_t address(void const* p) {
    return std::bit_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(p));
  }
  template <class P>
  static P const* pointer(std::int64_t a) {
    return reinterpret_cast<P const*>(std::bit_cast<std::uintptr_t>(a));
  }
  template <class Comm, class Count, class Fn>
  void exchange(Comm& ep, std::vector<std::int64_t>& desc, std::vector<std::int64_t> const& counts,
                Real const* rows, Real const* probs, std::int64_t h,
                std::span<std::int64_t const> rows_in, Count&& count, bool forward, Fn& fn) {
    std::size_t at = 0;
    for (auto const c : counts) {  // the pointer slots of every block
      desc[at] = address(rows);
      desc[at + 1] = address(probs);
      at += static_cast<std::size_t>(c);
    }
    recv_counts_.clear();
    for (auto const n : rows_in) recv_counts_.push_back(count(n));
    ep.template exchange_view<std::int64_t>(
        std::span<std::int64_t const>(desc), std::span<std::int64_t const>(counts),
        std::span<std::int64_t const>(recv_counts_),
        [&](std::span<std::span<std::int64_t const> const> blocks) {
          peers_.w_ = w_;
          peers_.h_ = h;
          peers_.blocks_.resize(blocks.size());
          peers_.start_.assign(1, 0);
          for (std::size_t j = 0; j < blocks.size(); ++j) {
            auto const& b = blocks[j];
            auto const n = rows_in[j];
            MOEFOLD_EXPECTS(static_cast<std::int64_t>(b.size()) == count(n),
                            "dispatcher peer reads: {} descriptor values from peer {}, expected {}",
                            b.size(), j, count(n));
            peers_.blocks_[j] = Block{pointer<Real>(b[0]), pointer<Real>(b[1]), b.data() + 2,
                                      forward ? b.data() + 2 + n : nullptr};
            peers_.start_.push_back(peers_.start_.back() + n);
          }
          fn(static_cast<Peers const&>(peers_));
        });
  }

  std::int64_t w_ = 1;
  std::vector<std::int64_t> fwd_, fwd_counts_, back_, back_counts_, back_index_, recv_counts_;
  Peers peers_;
};

}  // namespace detail
}  // namespace v0
}  // namespace moefold
