#pragma once
/// \file
/// Named axes of a process mesh. The attention mesh spans tp, cp, dp, pp; the MoE mesh spans
/// etp, ep, edp, pp. Both meshes lay out the same ranks.

#include <cstdint>
#include <initializer_list>
#include <string_view>

namespace moefold {
inline namespace v0 {

/// One named parallel dimension.
enum class Axis : std::uint8_t {
  tp,   ///< tensor parallel (attention side)
  cp,   ///< context parallel (attention side)
  dp,   ///< data parallel (attention side)
  pp,   ///< pipeline parallel (shared by both sides)
  ep,   ///< expert parallel (MoE side)
  etp,  ///< expert tensor parallel (MoE side)
  edp,  ///< expert data parallel (MoE side)
};

/// Number of distinct axis names.
inline constexpr int kAxisCount = 7;

/// The axis's name as Megatron spells its group ("tp", "etp", ...).
constexpr std::string_view name(Axis a) noexcept {
  switch (a) {
    case Axis::tp: return "tp";
    case Axis::cp: return "cp";
    case Axis::dp: return "dp";
    case Axis::pp: return "pp";
    case Axis::ep: return "ep";
    case Axis::etp: return "etp";
    case Axis::edp: return "edp";
  }
  return "?";
}

/// A set of axes (a bit mask), e.g. the axes that vary inside a group.
class AxisSet {
 public:
  constexpr AxisSet() = default;
  constexpr AxisSet(std::initializer_list<Axis> axes) {
    for (Axis a : axes) bits_ |= bit(a);
  }
  constexpr bool contains(Axis a) const noexcept { return (bits_ & bit(a)) != 0; }
  constexpr AxisSet& insert(Axis a) noexcept {
    bits_ |= bit(a);
    return *this;
  }
  constexpr bool empty() const noexcept { return bits_ == 0; }
  /// True when no axis is in both sets.
  constexpr bool disjoint(AxisSet other) const noexcept { return (bits_ & other.bits_) == 0; }
  constexpr bool operator==(AxisSet const&) const = default;

 private:
  static constexpr std::uint8_t bit(Axis a) noexcept {
    return static_cast<std::uint8_t>(1u << static_cast<unsigned>(a));
  }
  std::uint8_t bits_ = 0;
};

}  // namespace v0
}  // namespace moefold
