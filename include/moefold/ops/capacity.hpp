#pragma once
/// \file
/// Token dropping as bodies (spec §2.2 step 5): each expert column of a `[T, E]` routing ranks
/// its tokens in the drop policy's keep order — by position (the routed tokens first, each group
/// in token order) or by probability (routed first, then higher probability, ties toward the
/// lower token: a stable merge sort of the column) — and `ApplyCapacity` keeps the first C of
/// every column, turning the rest into `none` (or fillers into `padding`). One body call owns
/// one column (the rankings) or one entry (the decision).
///
///   ops::rank_columns(exec, ops::DropOrder::probs, map, none, probs, rank, scratch);
///   ops::apply_capacity(exec, rank, C, pad, map, probs, none, padding);

#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// The order in which an over-full expert keeps its tokens.
enum class DropOrder : std::uint8_t {
  position,  ///< routed tokens by position
  probs,     ///< routed tokens by probability, highest first (ties: lower token first)
};

/// rank[t·E + e] for column e: routed tokens ranked 0, 1, … in token order, then the others.
template <class M>
struct RankByPosition {
  M const* map;
  M none;
  std::int64_t tokens, experts;
  std::int64_t* rank;
  MOEFOLD_HD void operator()(std::int64_t e) const {
    std::int64_t r = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      if (map[t * experts + e] != none) rank[t * experts + e] = r++;
    for (std::int64_t t = 0; t < tokens; ++t)
      if (map[t * experts + e] == none) rank[t * experts + e] = r++;
  }
};

/// rank[t·E + e] for column e: the position of token t when the column's tokens are sorted by
/// (routed, probability) descending, stably (a bottom-up merge sort in `scratch [E, 2T]`).
template <class M, class T>
struct RankByProbs {
  M const* map;
  M none;
  T const* probs;
  std::int64_t tokens, experts;
  std::int64_t* scratch;
  std::int64_t* rank;

  /// Token a ranks strictly before token b in column e.
  MOEFOLD_HD bool better(std::int64_t a, std::int64_t b, std::int64_t e) const {
    bool const ra = map[a * experts + e] != none, rb = map[b * experts + e] != none;
    if (ra != rb) return ra;
    return widen(probs[a * experts + e]) > widen(probs[b * experts + e]);
  }
  MOEFOLD_HD void operator()(std::int64_t e) const {
    std::int64_t* order = scratch + e * 2 * tokens;
    std::int64_t* other = order + tokens;
    for (std::int64_t t = 0; t < tokens; ++t) order[t] = t;
    for (std::int64_t width = 1; width < tokens; width *= 2) {
      for (std::int64_t lo = 0; lo < tokens; lo += 2 * width) {
        std::int64_t const mid = lo + width < tokens ? lo + width : tokens;
        std::int64_t const hi = lo + 2 * width < tokens ? lo + 2 * width : tokens;
        std::int64_t i = lo, j = mid;
        for (std::int64_t k = lo; k < hi; ++k)
          other[k] = j < hi && (i >= mid || better(order[j], order[i], e)) ? order[j++] : order[i++];
      }
      std::int64_t* const swap = order;
      order = other;
      other = swap;
    }
    for (std::int64_t k = 0; k < tokens; ++k) rank[order[k] * experts + e] = k;
  }
};

/// Entry i keeps its route when rank[i] < capacity; a dropped entry becomes `none` with
/// probability 0, a kept non-routed one `padding` (with `pad`) or stays `none`, probability 0.
template <class M, class T>
struct ApplyCapacity {
  std::int64_t const* rank;
  std::int64_t capacity;
  bool pad;
  M none, padding;
  M* map;
  T* probs;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    if (rank[i] >= capacity) {
      map[i] = none;
      probs[i] = T(0);
    } else if (map[i] == none) {
      map[i] = pad ? padding : none;
      probs[i] = T(0);
    }
  }
};

/// The words of scratch `rank_columns` needs for a `[T, E]` routing in `order`.
constexpr std::int64_t rank_columns_scratch(DropOrder order, std::int64_t tokens,
                                            std::int64_t experts) noexcept {
  return order == DropOrder::probs ? 2 * tokens * experts : 0;
}

/// rank `[T, E]`: each entry's place in its column's keep order.
template <class Exec, class M, class T>
void rank_columns(Exec const& exec, DropOrder order, View<M const, typename Exec::memory_space> map,
                  M none, View<T const, typename Exec::memory_space> probs,
                  View<std::int64_t, typename Exec::memory_space> rank,
                  View<std::int64_t, typename Exec::memory_space> scratch) {
  std::int64_t const tokens = map.rows(), experts = map.cols();
  MOEFOLD_EXPECTS(map.contiguous() && probs.size() == map.size() && rank.size() == map.size() &&
                      scratch.size() >= rank_columns_scratch(order, tokens, experts),
                  "ops::rank_columns: a {}×{} map with {} probabilities, {} ranks and {} scratch",
                  tokens, experts, probs.size(), rank.size(), scratch.size());
  if (order == DropOrder::position)
    for_each(exec, experts, RankByPosition<M>{map.data(), none, tokens, experts, rank.data()});
  else
    for_each(exec, experts,
             RankByProbs<M, T>{map.data(), none, probs.data(), tokens, experts, scratch.data(),
                               rank.data()});
}

/// Keeps the entries ranked below `capacity` (see `ApplyCapacity`).
template <class Exec, class M, class T>
void apply_capacity(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> rank,
                    std::int64_t capacity, bool pad, M none, M padding,
                    View<M, typename Exec::memory_space> map,
                    View<T, typename Exec::memory_space> probs) {
  MOEFOLD_EXPECTS(rank.size() == map.size() && probs.size() == map.size(),
                  "ops::apply_capacity: {} ranks for {} map entries and {} probabilities",
                  rank.size(), map.size(), probs.size());
  for_each(exec, map.size(),
           ApplyCapacity<M, T>{rank.data(), capacity, pad, none, padding, map.data(), probs.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
