#pragma once
/// \file
/// The group catalogue: Megatron-Core's process groups by their JSON names (spec §1.5).

#include <array>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moefold {
inline namespace v0 {

/// A kind of process group. Each rank belongs to one group of each kind (except `embedding`
/// and `position_embedding`, which hold only the first and last pipeline stages).
enum class Group : std::uint8_t {
  tp,                  ///< attention tensor parallel; SP all-gather / reduce-scatter
  cp,                  ///< attention context parallel
  dp,                  ///< data parallel without CP
  dp_cp,               ///< dense gradient reduction
  pp,                  ///< pipeline stages (shared by both layouts)
  mp,                  ///< model parallel (tp-pp)
  tp_cp,               ///< router aux-loss statistics
  tp_dp,               ///< FP8 amax
  tp_dp_cp,            ///< global aux loss, expert-bias counts
  embedding,           ///< first and last pipeline stage: tied embeddings
  position_embedding,  ///< first pipeline stage
  ep,                  ///< expert parallel: token all-to-all
  etp,                 ///< expert tensor parallel
  tp_ep,               ///< expert tensor and model parallel: token-count all-gather
  tp_ep_pp,            ///< expert model parallel with pipeline
  edp,                 ///< expert data parallel: expert gradient reduction
  intra_partial_dp_cp,      ///< distributed optimizer, dense (NDOI > 1)
  intra_partial_edp,        ///< distributed optimizer, experts (NDOI > 1)
  inter_partial_edp,        ///< across optimizer instances (NDOI > 1)
  intra_dist_opt_instance,  ///< one optimizer instance (NDOI > 1)
};

inline constexpr int kGroupCount = 20;
/// The 16 groups every folding has, in catalogue order.
inline constexpr int kCoreGroupCount = 16;

/// Every group kind in catalogue order (the first `kCoreGroupCount` always exist).
inline constexpr std::array<Group, kGroupCount> kAllGroups{
    Group::tp,        Group::cp,         Group::dp,        Group::dp_cp,
    Group::pp,        Group::mp,         Group::tp_cp,     Group::tp_dp,
    Group::tp_dp_cp,  Group::embedding,  Group::position_embedding,
    Group::ep,        Group::etp,        Group::tp_ep,     Group::tp_ep_pp,
    Group::edp,       Group::intra_partial_dp_cp,          Group::intra_partial_edp,
    Group::inter_partial_edp,            Group::intra_dist_opt_instance};

/// The group's name as in `moefold groups --json`.
constexpr std::string_view name(Group g) noexcept {
  constexpr std::array<std::string_view, kGroupCount> names{
      "tp",       "cp",        "dp",    "dp_cp",    "pp",  "mp",
      "tp_cp",    "tp_dp",     "tp_dp_cp", "embedding", "position_embedding",
      "ep",       "etp",       "tp_ep", "tp_ep_pp", "edp", "intra_partial_dp_cp",
      "intra_partial_edp",     "inter_partial_edp",  "intra_dist_opt_instance"};
  return names[static_cast<std::size_t>(g)];
}

/// The group kind named `s`, or nullopt.
constexpr std::optional<Group> group_from_name(std::string_view s) noexcept {
  for (Group g : kAllGroups)
    if (name(g) == s) return g;
  return std::nullopt;
}

}  // namespace v0
}  // namespace moefold
