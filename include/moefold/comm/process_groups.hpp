#pragma once
/// \file
/// `ProcessGroups`: every group of a `FoldedMapping` that this rank belongs to, as a
/// communicator built with `split` from one world communicator. Each communicator's rank equals
/// the member index of spec §1.6 (group rank = position among the ascending members).
///
///   auto fold = moefold::FoldedMapping::from({.world = 8, .tp = 2, .cp = 2, .pp = 2,
///                                             .ep = 4, .etp = 1});
///   moefold::ProcessGroups groups(fold, world);   // collective over the world
///   groups.ep().all_to_all_v(...);                // token exchange among EP peers

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <vector>
#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/mesh/folded_mapping.hpp"

namespace moefold {
inline namespace v0 {

/// The communicators of one rank under a folding.
template <Communicator Comm>
class ProcessGroups {
 public:
  /// Builds a communicator for every group kind of `fold.catalogue()` (the 16 core groups, and
  /// the distributed-optimizer groups when there are several instances) with one `split` each,
  /// named after its group kind ("ep", …) for error messages where the backend has
  /// `set_group_name` (inproc, mpi).
  /// Collective over `world`: every rank must call it, with the same folding.
  /// Throws `invalid_config` when `world.size()` differs from the folding's world size.
  ProcessGroups(FoldedMapping fold, Comm world) : fold_(std::move(fold)), world_(std::move(world)) {
    if (world_.size() != fold_.world_size()) {
      throw invalid_config(fmt::format(
          "ProcessGroups: the folding is for world_size {} but the communicator has {} ranks",
          fold_.world_size(), world_.size()));
    }
    int const me = world_.rank();
    for (Group g : fold_.catalogue()) {
      auto const groups = fold_.groups(g);
      int color = kUndefinedColor;
      int key = 0;
      for (std::size_t i = 0; i < groups.size(); ++i) {
        auto sorted = groups[i];
        std::sort(sorted.begin(), sorted.end());
        auto it = std::find(sorted.begin(), sorted.end(), me);
        if (it != sorted.end()) {
          color = static_cast<int>(i);
          key = static_cast<int>(it - sorted.begin());
          break;
        }
      }
      comms_[static_cast<std::size_t>(g)] = world_.split(color, key);
      // Backends that name their groups in error messages get Megatron's names ("ep", …).
      if constexpr (requires(Comm& c) { c.set_group_name(std::string()); })
        comms_[static_cast<std::size_t>(g)]->set_group_name(std::string(name(g)));
    }
  }

  FoldedMapping const& mapping() const noexcept { return fold_; }
  /// The world communicator the groups were split from.
  Comm& world() noexcept { return world_; }

  /// The communicator of group kind `g` (a null communicator when this rank is in no group of
  /// that kind, e.g. `embedding` on a middle pipeline stage). Throws for a kind the folding does
  /// not have (the distributed-optimizer groups with a single instance).
  Comm& get(Group g) {
    auto& c = comms_[static_cast<std::size_t>(g)];
    if (!c) {
      throw error(errc::invalid_argument,
                  fmt::format("ProcessGroups: no '{}' group with num_distributed_optimizer_"
                              "instances = {}",
                              name(g), fold_.num_distributed_optimizer_instances()));
    }
    return *c;
  }

  Comm& tp() { return get(Group::tp); }              ///< attention tensor parallel
  Comm& cp() { return get(Group::cp); }              ///< attention context parallel
  Comm& dp() { return get(Group::dp); }              ///< data parallel (without CP)
  Comm& dp_cp() { return get(Group::dp_cp); }        ///< dense gradient reduction
  Comm& pp() { return get(Group::pp); }              ///< pipeline stages
  Comm& mp() { return get(Group::mp); }              ///< model parallel (tp-pp)
  Comm& tp_cp() { return get(Group::tp_cp); }        ///< router aux-loss statistics
  Comm& tp_dp() { return get(Group::tp_dp); }        ///< tp-dp
  Comm& tp_dp_cp() { return get(Group::tp_dp_cp); }  ///< global aux loss, expert-bias counts
  Comm& embedding() { return get(Group::embedding); }                    ///< tied embeddings
  Comm& position_embedding() { return get(Group::position_embedding); }  ///< first stage
  Comm& ep() { return get(Group::ep); }              ///< expert parallel: token all-to-all
  Comm& etp() { return get(Group::etp); }            ///< expert tensor parallel
  Comm& tp_ep() { return get(Group::tp_ep); }        ///< token-count all-gather
  Comm& tp_ep_pp() { return get(Group::tp_ep_pp); }  ///< expert model parallel with pipeline
  Comm& edp() { return get(Group::edp); }            ///< expert gradient reduction

 private:
  FoldedMapping fold_;
  Comm world_;
  std::array<std::optional<Comm>, kGroupCount> comms_{};
};

}  // namespace v0
}  // namespace moefold
