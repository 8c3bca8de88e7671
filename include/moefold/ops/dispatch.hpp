#pragma once
/// \file
/// The dispatchers' row maps as bodies, so that a routing in device memory never has to visit
/// the host: sort keys for the instance's `stable_sort_by_key` and the rows they order.
///
/// - all-to-all with dedup: `DestinationKeys` (one key per (EP rank j, token t): j when t goes to
///   any of j's experts) and `DestinationRows` (each sent row's token and its L routing entries);
/// - the receiving side of dedup: `ExpandKeys` / `ExpandRows` (each received row copied once per
///   local expert it carries, local-expert major);
/// - all-gather: `LocalExpertKeys` / `LocalExpertRows` (the gathered tokens of each local expert);
/// - `SelectNonNegative` (which of a row's L slots hold an entry; a one-bin histogram key that
///   counts entries ≥ 0).
///
/// An index i of a `[A, B]` key layout is (i / B, i mod B); sorting the keys stably orders rows
/// by key, then by index — the loops' order of the host code these bodies replace.

#include <cstdint>

#include "moefold/core/error.hpp"
#include "moefold/core/hd.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/instance.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

/// keys[j·T + t] = j if token t routes to any of EP rank j's L experts, else −1.
template <class M>
struct DestinationKeys {
  M const* map;  ///< [T, E], E = ranks · L
  M none;
  std::int64_t tokens, local, experts;
  std::int64_t* keys;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const j = i / tokens, t = i % tokens;
    std::int64_t const base = t * experts + j * local;
    bool any = false;
    for (std::int64_t l = 0; l < local; ++l) any = any || map[base + l] != none;
    keys[i] = any ? j : -1;
  }
};

/// For sent row r (order[r] = j·T + t): token[r] = t, and entry[r·L + l] = the routing entry
/// t·E + j·L + l, or −1 where the token does not go to that expert.
template <class M>
struct DestinationRows {
  std::int64_t const* order;
  M const* map;
  M none;
  std::int64_t tokens, local, experts;
  std::int64_t* token;
  std::int64_t* entry;
  MOEFOLD_HD void operator()(std::int64_t r) const {
    std::int64_t const i = order[r];
    std::int64_t const j = i / tokens, t = i % tokens;
    std::int64_t const base = t * experts + j * local;
    token[r] = t;
    for (std::int64_t l = 0; l < local; ++l)
      entry[r * local + l] = map[base + l] != none ? base + l : -1;
  }
};

/// out[i] = `yes` where v[i] ≥ 0, else `no`: which of a row's L slots hold an entry (flags
/// 1/0), or a one-bin histogram key (0/−1) that counts the entries ≥ 0.
template <class O>
struct SelectNonNegative {
  std::int64_t const* v;
  O yes, no;
  O* out;
  MOEFOLD_HD void operator()(std::int64_t i) const { out[i] = v[i] >= 0 ? yes : no; }
};

/// keys[l·R + r] = l where received row r carries local expert l (flags[r·L + l] ≠ 0), else −1.
struct ExpandKeys {
  std::uint8_t const* flags;
  std::int64_t rows, local;
  std::int64_t* keys;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const l = i / rows, r = i % rows;
    keys[i] = flags[r * local + l] != 0 ? l : -1;
  }
};

/// For expert row n (order[n] = l·R + r): src[n] = r, slot[n] = r·L + l.
struct ExpandRows {
  std::int64_t const* order;
  std::int64_t rows, local;
  std::int64_t* src;
  std::int64_t* slot;
  MOEFOLD_HD void operator()(std::int64_t n) const {
    std::int64_t const l = order[n] / rows, r = order[n] % rows;
    src[n] = r;
    slot[n] = r * local + l;
  }
};

/// keys[l·G + u] = l where gathered token u routes to expert `first + l`, else −1.
template <class M>
struct LocalExpertKeys {
  M const* map;  ///< [G, E]
  M none;
  std::int64_t tokens, experts, first;
  std::int64_t* keys;
  MOEFOLD_HD void operator()(std::int64_t i) const {
    std::int64_t const l = i / tokens, u = i % tokens;
    keys[i] = map[u * experts + first + l] != none ? l : -1;
  }
};

/// For expert row n (order[n] = l·G + u): src[n] = u, entry[n] = u·E + first + l where that
/// entry is `routed`, else −1 (a padding slot).
template <class M>
struct LocalExpertRows {
  std::int64_t const* order;
  M const* map;
  M routed;
  std::int64_t tokens, experts, first;
  std::int64_t* src;
  std::int64_t* entry;
  MOEFOLD_HD void operator()(std::int64_t n) const {
    std::int64_t const l = order[n] / tokens, u = order[n] % tokens;
    std::int64_t const at = u * experts + first + l;
    src[n] = u;
    entry[n] = map[at] == routed ? at : -1;
  }
};


namespace detail {
inline void check_layout(std::int64_t got, std::int64_t a, std::int64_t b, char const* op) {
  MOEFOLD_EXPECTS(got == a * b, "ops::{}: {} keys for a {}×{} layout", op, got, a, b);
}
}  // namespace detail

/// keys [EP·T]: `DestinationKeys` of the `[T, EP·L]` map.
template <class Exec, class M>
void destination_keys(Exec const& exec, View<M const, typename Exec::memory_space> map, M none,
                      std::int64_t local, View<std::int64_t, typename Exec::memory_space> keys) {
  std::int64_t const tokens = map.rows(), experts = map.cols();
  MOEFOLD_EXPECTS(local >= 1 && experts % local == 0, "ops::destination_keys: {} experts in groups of {}",
                  experts, local);
  detail::check_layout(keys.size(), experts / local, tokens, "destination_keys");
  for_each(exec, keys.size(),
           DestinationKeys<M>{map.data(), none, tokens, local, experts, keys.data()});
}

/// token [N], entry [N·L] of the sent rows `order [N]` (see `DestinationRows`).
template <class Exec, class M>
void destination_rows(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> order,
                      View<M const, typename Exec::memory_space> map, M none, std::int64_t local,
                      View<std::int64_t, typename Exec::memory_space> token,
                      View<std::int64_t, typename Exec::memory_space> entry) {
  detail::check_layout(entry.size(), order.size(), local, "destination_rows");
  MOEFOLD_EXPECTS(token.size() == order.size(), "ops::destination_rows: {} tokens for {} rows",
                  token.size(), order.size());
  for_each(exec, order.size(),
           DestinationRows<M>{order.data(), map.data(), none, map.rows(), local, map.cols(),
                              token.data(), entry.data()});
}

/// out[i] = v[i] ≥ 0 ? yes : no.
template <class Exec, class O>
void select_non_negative(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> v,
                         O yes, O no, View<O, typename Exec::memory_space> out) {
  MOEFOLD_EXPECTS(v.size() == out.size(), "ops::select_non_negative: {} values for {} outputs",
                  v.size(), out.size());
  for_each(exec, v.size(), SelectNonNegative<O>{v.data(), yes, no, out.data()});
}

/// keys [L·R] of R received rows' flags [R·L] (see `ExpandKeys`).
template <class Exec>
void expand_keys(Exec const& exec, View<std::uint8_t const, typename Exec::memory_space> flags,
                 std::int64_t local, View<std::int64_t, typename Exec::memory_space> keys) {
  MOEFOLD_EXPECTS(local >= 1 && flags.size() % local == 0 && keys.size() == flags.size(),
                  "ops::expand_keys: {} flags of {} local experts for {} keys", flags.size(), local,
                  keys.size());
  for_each(exec, keys.size(), ExpandKeys{flags.data(), flags.size() / local, local, keys.data()});
}

/// src [N], slot [N] of the sorted expansion `order [N]` over R rows (see `ExpandRows`).
template <class Exec>
void expand_rows(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> order,
                 std::int64_t rows, std::int64_t local,
                 View<std::int64_t, typename Exec::memory_space> src,
                 View<std::int64_t, typename Exec::memory_space> slot) {
  MOEFOLD_EXPECTS(src.size() == order.size() && slot.size() == order.size() && rows >= 0,
                  "ops::expand_rows: {} sources and {} slots for {} rows", src.size(), slot.size(),
                  order.size());
  for_each(exec, order.size(), ExpandRows{order.data(), rows, local, src.data(), slot.data()});
}

/// keys [L·G] of the gathered `[G, E]` map for experts [first, first + L).
template <class Exec, class M>
void local_expert_keys(Exec const& exec, View<M const, typename Exec::memory_space> map, M none,
                       std::int64_t first, std::int64_t local,
                       View<std::int64_t, typename Exec::memory_space> keys) {
  MOEFOLD_EXPECTS(first >= 0 && local >= 1 && first + local <= map.cols(),
                  "ops::local_expert_keys: experts [{}, {}) of {}", first, first + local, map.cols());
  detail::check_layout(keys.size(), local, map.rows(), "local_expert_keys");
  for_each(exec, keys.size(),
           LocalExpertKeys<M>{map.data(), none, map.rows(), map.cols(), first, keys.data()});
}

/// src [N], entry [N] of the sorted local-expert rows `order [N]` (see `LocalExpertRows`).
template <class Exec, class M>
void local_expert_rows(Exec const& exec, View<std::int64_t const, typename Exec::memory_space> order,
                       View<M const, typename Exec::memory_space> map, M routed, std::int64_t first,
                       View<std::int64_t, typename Exec::memory_space> src,
                       View<std::int64_t, typename Exec::memory_space> entry) {
  MOEFOLD_EXPECTS(src.size() == order.size() && entry.size() == order.size(),
                  "ops::local_expert_rows: {} sources and {} entries for {} rows", src.size(),
                  entry.size(), order.size());
  for_each(exec, order.size(),
           LocalExpertRows<M>{order.data(), map.data(), routed, map.rows(), map.cols(), first,
                              src.data(), entry.data()});
}

}  // namespace ops
}  // namespace v0
}  // namespace moefold
