#pragma once
/// \file
/// `FoldedMapping`: the attention layout (TP × CP × DP × PP) and the MoE layout
/// (ETP × EP × EDP × PP) over one world, validated with every rule of Megatron-Core's
/// `initialize_model_parallel`, and the catalogue of process groups both layouts define.
///
///   W=16, TP2 CP2 PP2 / EP4 ETP2 (spec §1.7), one pipeline stage (ranks 0..7):
///
///     attention  rank = tp + 2·cp + 4·dp        MoE  rank = etp + 2·ep
///         cp=0  cp=1                                 ep=0  ep=1  ep=2  ep=3
///     dp0  0 1   2 3                                  0 1   2 3   4 5   6 7
///     dp1  4 5   6 7
///
///   the EP group {0,2,4,6} crosses CP and DP replicas: CP and DP are folded into EP.

#include <algorithm>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <fmt/ranges.h>
#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/mesh/group.hpp"
#include "moefold/mesh/order.hpp"
#include "moefold/mesh/process_mesh.hpp"

namespace moefold {
inline namespace v0 {

/// The sizes a folding is made from, with Megatron's meanings. DP and EDP are derived.
struct FoldingConfig {
  int world = 1;  ///< world size W
  int tp = 1;     ///< tensor_model_parallel_size (attention)
  int cp = 1;     ///< context_parallel_size (attention)
  int pp = 1;     ///< pipeline_model_parallel_size (both layouts)
  int ep = 1;     ///< expert_model_parallel_size
  /// expert_tensor_parallel_size; unset means equal to `tp`, as in Megatron (the paper
  /// recommends 1).
  std::optional<int> etp = std::nullopt;
  std::string order = std::string(kDefaultOrder);  ///< rank order, fastest axis first
  int num_distributed_optimizer_instances = 1;
  /// virtual_pipeline_model_parallel_size, when interleaving is used (needs PP > 1).
  std::optional<int> vpp = std::nullopt;
};

/// Two parallel layouts of one world: the attention mesh (tp, cp, dp, pp) and the MoE mesh
/// (etp, ep, edp, pp), with identical pipeline groups.
class FoldedMapping {
 public:
  /// Validates `c` with Megatron's checks, in Megatron's order; throws `invalid_config` whose
  /// message names the broken rule and the numbers.
  static FoldedMapping from(FoldingConfig const& c) {
    FoldedMapping m;
    auto positive = [](int v, std::string_view what) {
      if (v < 1) throw invalid_config(fmt::format("{} must be at least 1 (got {})", what, v));
    };
    positive(c.world, "world_size");
    positive(c.tp, "tensor_model_parallel_size (TP)");
    positive(c.cp, "context_parallel_size (CP)");
    positive(c.pp, "pipeline_model_parallel_size (PP)");
    positive(c.ep, "expert_model_parallel_size (EP)");
    if (c.etp) positive(*c.etp, "expert_tensor_parallel_size (ETP)");
    positive(c.num_distributed_optimizer_instances, "num_distributed_optimizer_instances");
    if (c.vpp) positive(*c.vpp, "virtual_pipeline_model_parallel_size (VPP)");

    m.world_ = c.world;
    m.tp_ = c.tp;
    m.cp_ = c.cp;
    m.pp_ = c.pp;
    m.ep_ = c.ep;
    m.ndoi_ = c.num_distributed_optimizer_instances;

    // 1. world divisible by the model-parallel size.
    long const model_size = product(c.tp, c.pp, c.cp);
    if (c.world % model_size != 0) {
      throw invalid_config(fmt::format(
          "world_size ({}) is not divisible by model_size TP·PP·CP = {} (TP={}, PP={}, CP={})",
          c.world, model_size, c.tp, c.pp, c.cp));
    }
    m.dp_ = static_cast<int>(c.world / model_size);
    // 2. virtual pipeline needs a pipeline.
    if (c.vpp && c.pp <= 1) {
      throw invalid_config(fmt::format(
          "virtual pipeline parallelism (VPP={}) requires pipeline_model_parallel_size > 1 "
          "(PP={})",
          *c.vpp, c.pp));
    }
    // 3. the dense (attention) generator.
    Order const order = Order::parse(c.order);
    m.order_ = order.text();
    auto const dense_order = order.normalized(
        [&](OrderAxis a) { return m.dense_size(a); }, "attention");
    for (OrderAxis a : dense_order)
      if (auto axis = dense_axis(a)) m.attention_.push(*axis, m.dense_size(a));
    // 4. the expert generator.
    m.etp_ = c.etp.value_or(c.tp);
    long const expert_size = product(m.etp_, c.ep, c.pp);
    if (c.world % expert_size != 0) {
      throw invalid_config(fmt::format(
          "world_size ({}) is not divisible by expert_tensor_model_pipeline_parallel size "
          "ETP·EP·PP = {} (ETP={}, EP={}, PP={})",
          c.world, expert_size, m.etp_, c.ep, c.pp));
    }
    m.edp_ = static_cast<int>(c.world / expert_size);
    auto const expert_order =
        order.normalized([&](OrderAxis a) { return m.expert_size(a); }, "MoE");
    for (OrderAxis a : expert_order)
      if (auto axis = expert_axis(a)) m.moe_.push(*axis, m.expert_size(a));
    // 5. without pp-last ordering both sides need the same data-parallel size.
    if (!order.ends_with_pp() && c.pp != 1 && m.edp_ != m.dp_) {
      throw invalid_config(fmt::format(
          "When not using pp-last rank ordering, the data parallel size of the attention and moe "
          "layers must be the same: order '{}' does not end with pp and PP={}, but DP={} and "
          "EDP={}",
          m.order_, c.pp, m.dp_, m.edp_));
    }
    // 6. both layouts must give the same pipeline groups.
    auto const dense_pp = m.attention_.groups({Axis::pp});
    auto const expert_pp = m.moe_.groups({Axis::pp});
    for (int g = 0; g < dense_pp.count(); ++g) {
      if (dense_pp[g].ranks() != expert_pp[g].ranks()) {
        throw invalid_config(fmt::format(
            "the attention and MoE layouts must have the same pipeline (pp) groups, but with "
            "order '{}' attention pp group {} is [{}] and the MoE one is [{}] (TP={}, ETP={})",
            m.order_, g, fmt::join(dense_pp[g].ranks(), ","), fmt::join(expert_pp[g].ranks(), ","),
            c.tp, m.etp_));
      }
    }
    // 7. distributed-optimizer instances divide both data-parallel domains.
    if ((m.dp_ * c.cp) % m.ndoi_ != 0) {
      throw invalid_config(fmt::format(
          "DP·CP = {} (DP={}, CP={}) is not divisible by num_distributed_optimizer_instances = {}",
          m.dp_ * c.cp, m.dp_, c.cp, m.ndoi_));
    }
    if (m.edp_ % m.ndoi_ != 0) {
      throw invalid_config(fmt::format(
          "EDP = {} is not divisible by num_distributed_optimizer_instances = {}", m.edp_,
          m.ndoi_));
    }
    return m;
  }

  int world_size() const noexcept { return world_; }
  int tp() const noexcept { return tp_; }
  int cp() const noexcept { return cp_; }
  int dp() const noexcept { return dp_; }
  int pp() const noexcept { return pp_; }
  int ep() const noexcept { return ep_; }
  int etp() const noexcept { return etp_; }
  int edp() const noexcept { return edp_; }
  int num_distributed_optimizer_instances() const noexcept { return ndoi_; }
  /// The order string, lower-cased, as given.
  std::string const& order() const noexcept { return order_; }

  /// The attention layout over axes tp, cp, dp, pp.
  ProcessMesh const& attention_mesh() const noexcept { return attention_; }
  /// The MoE layout over axes etp, ep, edp, pp.
  ProcessMesh const& moe_mesh() const noexcept { return moe_; }
  /// Coordinates of `rank` in the attention layout (tp, cp, dp, pp).
  MeshCoord attention_coord(int rank) const noexcept { return attention_.coord(rank); }
  /// Coordinates of `rank` in the MoE layout (etp, ep, edp, pp).
  MeshCoord moe_coord(int rank) const noexcept { return moe_.coord(rank); }

  /// The group kinds of this mapping, in catalogue order: the 16 core groups, plus the four
  /// distributed-optimizer groups when num_distributed_optimizer_instances > 1.
  std::span<Group const> catalogue() const noexcept {
    return std::span<Group const>(kAllGroups).first(ndoi_ > 1 ? kGroupCount : kCoreGroupCount);
  }

  /// Every group of kind `g`, groups and members in Megatron's order.
  std::vector<std::vector<int>> groups(Group g) const {
    if (auto fam = family(g)) return fam->lists();
    std::vector<std::vector<int>> out;
    switch (g) {
      case Group::embedding:
      case Group::position_embedding:
        for (auto const& stage : attention_.groups({Axis::pp}).lists())
          out.push_back(embedding_ranks(stage, g));
        break;
      case Group::intra_partial_dp_cp:
        for (auto const& parent : groups(Group::dp_cp)) append_slices(out, parent, dp_ * cp_ / ndoi_);
        break;
      case Group::intra_partial_edp:
        for (auto const& parent : groups(Group::edp)) append_slices(out, parent, edp_ / ndoi_);
        break;
      case Group::inter_partial_edp:
        for (auto const& parent : groups(Group::edp)) append_strided(out, parent, edp_ / ndoi_);
        break;
      case Group::intra_dist_opt_instance: {
        int const per_instance = edp_ / ndoi_;
        std::vector<int> current;
        int n = 0;
        for (auto const& part : groups(Group::tp_ep_pp)) {
          current.insert(current.end(), part.begin(), part.end());
          if (++n == per_instance) {
            out.push_back(std::move(current));
            current.clear();
            n = 0;
          }
        }
        break;
      }
      default: break;
    }
    return out;
  }

  /// The members of the group of kind `g` that holds `rank`, in ascending order (the
  /// communicator's view: a member's group rank is its position here). Empty when `rank` is in
  /// no group of that kind (embedding groups hold only the first and last stages).
  std::vector<int> group_of(Group g, int rank) const {
    MOEFOLD_EXPECTS(rank >= 0 && rank < world_, "rank {} is outside the world of size {}", rank,
                    world_);
    if (auto fam = family(g)) return fam->containing(rank).ranks();
    for (auto& members : groups(g)) {
      if (std::find(members.begin(), members.end(), rank) != members.end()) {
        std::sort(members.begin(), members.end());
        return members;
      }
    }
    return {};
  }

  /// The rank of `rank` within its group of kind `g` (spec §1.6), or nullopt when it is in none.
  std::optional<int> rank_in_group(Group g, int rank) const {
    MOEFOLD_EXPECTS(rank >= 0 && rank < world_, "rank {} is outside the world of size {}", rank,
                    world_);
    if (auto fam = family(g)) return fam->containing(rank).index_of(rank);
    auto const members = group_of(g, rank);
    auto it = std::find(members.begin(), members.end(), rank);
    if (it == members.end()) return std::nullopt;
    return static_cast<int>(it - members.begin());
  }

 private:
  FoldedMapping() = default;

  /// a·b·c for positive ints, saturated at LONG_MAX (three ints can overflow a long; a saturated
  /// product never divides the world).
  static long product(long a, long b, long c) noexcept {
    return a * b > std::numeric_limits<long>::max() / c ? std::numeric_limits<long>::max()
                                                         : a * b * c;
  }

  int dense_size(OrderAxis a) const noexcept {
    switch (a) {
      case OrderAxis::tp: return tp_;
      case OrderAxis::cp: return cp_;
      case OrderAxis::dp: return dp_;
      case OrderAxis::pp: return pp_;
      default: return 1;
    }
  }
  int expert_size(OrderAxis a) const noexcept {
    switch (a) {
      case OrderAxis::tp: return etp_;
      case OrderAxis::ep: return ep_;
      case OrderAxis::dp: return edp_;
      case OrderAxis::pp: return pp_;
      default: return 1;
    }
  }
  static std::optional<Axis> dense_axis(OrderAxis a) noexcept {
    switch (a) {
      case OrderAxis::tp: return Axis::tp;
      case OrderAxis::cp: return Axis::cp;
      case OrderAxis::dp: return Axis::dp;
      case OrderAxis::pp: return Axis::pp;
      default: return std::nullopt;  // ep and gtp_remat have size 1 on the dense side
    }
  }
  static std::optional<Axis> expert_axis(OrderAxis a) noexcept {
    switch (a) {
      case OrderAxis::tp: return Axis::etp;
      case OrderAxis::ep: return Axis::ep;
      case OrderAxis::dp: return Axis::edp;
      case OrderAxis::pp: return Axis::pp;
      default: return std::nullopt;  // cp and gtp_remat have size 1 on the expert side
    }
  }

  /// The mesh slice behind a group kind, for the kinds that are slices.
  std::optional<GroupFamily> family(Group g) const noexcept {
    switch (g) {
      case Group::tp: return attention_.groups({Axis::tp});
      case Group::cp: return attention_.groups({Axis::cp});
      case Group::dp: return attention_.groups({Axis::dp});
      case Group::dp_cp: return attention_.groups({Axis::dp, Axis::cp});
      case Group::pp: return attention_.groups({Axis::pp});
      case Group::mp: return attention_.groups({Axis::tp, Axis::pp});
      case Group::tp_cp: return attention_.groups({Axis::tp, Axis::cp});
      case Group::tp_dp: return attention_.groups({Axis::tp, Axis::dp});
      case Group::tp_dp_cp: return attention_.groups({Axis::tp, Axis::dp, Axis::cp});
      case Group::ep: return moe_.groups({Axis::ep});
      case Group::etp: return moe_.groups({Axis::etp});
      case Group::tp_ep: return moe_.groups({Axis::etp, Axis::ep});
      case Group::tp_ep_pp: return moe_.groups({Axis::etp, Axis::ep, Axis::pp});
      case Group::edp: return moe_.groups({Axis::edp});
      case Group::intra_partial_dp_cp:
        if (ndoi_ == 1) return attention_.groups({Axis::dp, Axis::cp});
        return std::nullopt;
      case Group::intra_partial_edp:
        if (ndoi_ == 1) return moe_.groups({Axis::edp});
        return std::nullopt;
      default: return std::nullopt;
    }
  }

  /// Megatron's embedding ranks of one pipeline group: first and last stage (first only when
  /// PP = 1); the position embedding lives on the first stage only.
  static std::vector<int> embedding_ranks(std::vector<int> const& stage, Group g) {
    if (g == Group::position_embedding || stage.size() == 1) return {stage.front()};
    return {stage.front(), stage.back()};
  }
  /// Cuts `parent` into contiguous slices of `len` members.
  static void append_slices(std::vector<std::vector<int>>& out, std::vector<int> const& parent,
                            int len) {
    for (std::size_t k = 0; k < parent.size(); k += static_cast<std::size_t>(len))
      out.emplace_back(parent.begin() + static_cast<std::ptrdiff_t>(k),
                       parent.begin() + static_cast<std::ptrdiff_t>(k + static_cast<std::size_t>(len)));
  }
  /// For j < stride: the members parent[j], parent[j+stride], ...
  static void append_strided(std::vector<std::vector<int>>& out, std::vector<int> const& parent,
                             int stride) {
    for (int j = 0; j < stride; ++j) {
      std::vector<int> members;
      for (std::size_t k = static_cast<std::size_t>(j); k < parent.size();
           k += static_cast<std::size_t>(stride))
        members.push_back(parent[k]);
      out.push_back(std::move(members));
    }
  }

  int world_ = 1, tp_ = 1, cp_ = 1, dp_ = 1, pp_ = 1, ep_ = 1, etp_ = 1, edp_ = 1, ndoi_ = 1;
  std::string order_;
  ProcessMesh attention_;
  ProcessMesh moe_;
};

}  // namespace v0
}  // namespace moefold
