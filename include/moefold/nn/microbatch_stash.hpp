#pragma once
/// \file
/// Activations per in-flight microbatch. A pipeline schedule runs several forwards before their
/// backwards (1F1B holds up to PP − p microbatches on stage p); Megatron keeps each one's saved
/// tensors until its backward. A layer keeps the tensors of its *last* forward in its members;
/// `MicrobatchStash` moves them aside under the microbatch's index after the forward (`stash`)
/// and swaps them back before its backward (`restore`):
///
///   layer.forward(x0, {.microbatch = 0});  layer.stash(0);
///   layer.forward(x1, {.microbatch = 1});  layer.stash(1);
///   layer.restore(0);  layer.backward(dy0);
///   layer.restore(1);  layer.backward(dy1);
///
/// Moves, never copies: `stash` swaps the live members with a spare set (the buffers of an
/// earlier, finished microbatch), so a warm step allocates nothing and the next forward reuses
/// those buffers. A layer names its saved members once (`saved()`, a `std::tie`), forwards
/// `stash`/`restore`/`drop_stashed` to its sub-layers, and is a `StashingLayer`.
/// `DecoderStage` uses this unless `recompute_granularity` is `full` (then it re-runs each
/// chunk's forward before its backward and keeps only the chunk inputs).

#include <concepts>
#include <map>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// A layer that keeps the saved tensors of several microbatches: `stash(mb)` after the forward
/// of microbatch `mb`, `restore(mb)` before its backward, `drop_stashed()` to forget every
/// stashed microbatch (a new step, or one that failed half way).
template <class L>
concept StashingLayer = requires(L& l, int mb) {
  l.stash(mb);
  l.restore(mb);
  l.drop_stashed();
};

/// The saved members of one layer, per microbatch (see the file comment). Each call of one
/// stash must name the same member types (a layer's `saved()`).
class MicrobatchStash {
 public:
  /// Moves the live members (the last forward's) aside as microbatch `mb`'s; they receive a spare
  /// set. Throws when `mb` is already stashed.
  template <class... Ts>
  void stash(int mb, std::tuple<Ts&...> live) {
    using Slot = Holder<std::tuple<Ts...>>;
    MOEFOLD_EXPECTS(!parked_.contains(mb),
                    "microbatch {} is stashed already (a second forward before its backward)", mb);
    std::unique_ptr<Base> slot;
    if (!spare_.empty()) {
      slot = std::move(spare_.back());
      spare_.pop_back();
    } else {
      slot = std::make_unique<Slot>();
    }
    swap_all(live, held<Slot>(*slot));
    parked_.emplace(mb, std::move(slot));
  }
  /// Swaps microbatch `mb`'s members back into the live ones (the previous live set becomes a
  /// spare). Throws when `mb` was not stashed.
  template <class... Ts>
  void restore(int mb, std::tuple<Ts&...> live) {
    using Slot = Holder<std::tuple<Ts...>>;
    auto const it = parked_.find(mb);
    MOEFOLD_EXPECTS(it != parked_.end(),
                    "no stashed activations of microbatch {} (its forward did not run in this "
                    "step, or its backward ran already)",
                    mb);
    swap_all(live, held<Slot>(*it->second));
    spare_.push_back(std::move(it->second));
    parked_.erase(it);
  }
  /// Forgets every stashed microbatch (their buffers become spares).
  void drop() {
    for (auto& [mb, slot] : parked_) spare_.push_back(std::move(slot));
    parked_.clear();
  }
  /// Number of microbatches stashed now.
  std::size_t size() const noexcept { return parked_.size(); }

 private:
  struct Base {
    virtual ~Base() = default;
  };
  template <class Tuple>
  struct Holder final : Base {
    Tuple members;
  };
  template <class Slot>
  static auto& held(Base& b) {
    auto* h = dynamic_cast<Slot*>(&b);
    MOEFOLD_EXPECTS(h != nullptr, "MicrobatchStash: a layer stashed members of another type");
    return h->members;
  }
  template <class Live, class Held>
  static void swap_all(Live& live, Held& held) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      using std::swap;
      (swap(std::get<I>(live), std::get<I>(held)), ...);
    }(std::make_index_sequence<std::tuple_size_v<Held>>{});
  }

  std::map<int, std::unique_ptr<Base>> parked_;
  std::vector<std::unique_ptr<Base>> spare_;
};

}  // namespace v0
}  // namespace moefold
