#pragma once
/// \file
/// `ProcessMesh`: a layout of ranks over named axes, shape : stride with the first axis fastest
/// (like a CuTe layout, or Megatron's `RankGenerator`), and `GroupFamily`: all groups obtained by
/// letting a set of axes vary while the others stay fixed.
///
///   attention mesh tp2·cp2·dp2·pp2 over 16 ranks, strides 1:2:4:8
///     rank = tp + 2·cp + 4·dp + 8·pp
///   groups({cp, dp}) = the dp_cp groups {0,2,4,6} {1,3,5,7} {8,..,14} {9,..,15}

#include <array>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "moefold/mesh/axis.hpp"
#include "moefold/mesh/rank_group.hpp"

namespace moefold {
inline namespace v0 {

/// Coordinates of a rank: one entry per axis name (axes absent from the mesh read 0).
class MeshCoord {
 public:
  constexpr int operator[](Axis a) const noexcept { return v_[static_cast<int>(a)]; }
  constexpr int& operator[](Axis a) noexcept { return v_[static_cast<int>(a)]; }
  constexpr bool operator==(MeshCoord const&) const = default;

 private:
  std::array<int, kAxisCount> v_{};
};

class GroupFamily;

/// A layout of `rank_count()` ranks over up to `kMaxMeshAxes` named axes, first axis fastest:
/// `rank = offset + Σ_i coord_i · stride_i` with `stride_i = Π_{j<i} extent_j`.
class ProcessMesh {
 public:
  constexpr ProcessMesh() = default;
  /// Axes in layout order (first fastest) with their extents. Preconditions (checked by the
  /// callers that build meshes from user input): extents ≥ 1, no axis twice, ≤ kMaxMeshAxes.
  constexpr ProcessMesh(std::initializer_list<std::pair<Axis, int>> dims, int offset = 0) noexcept
      : offset_(offset) {
    for (auto [axis, extent] : dims) push(axis, extent);
  }
  /// Appends an axis as the new slowest one.
  constexpr void push(Axis axis, int extent) noexcept {
    axes_[n_] = axis;
    extents_[n_] = extent;
    strides_[n_] = count_;
    count_ *= extent;
    ++n_;
  }

  constexpr int rank_count() const noexcept { return count_; }
  constexpr int axis_count() const noexcept { return n_; }
  constexpr Axis axis(int i) const noexcept { return axes_[i]; }
  constexpr int extent(int i) const noexcept { return extents_[i]; }
  constexpr int stride(int i) const noexcept { return strides_[i]; }
  constexpr int offset() const noexcept { return offset_; }

  /// Position of `a` in the layout, or nullopt when the mesh does not have it.
  constexpr std::optional<int> find(Axis a) const noexcept {
    for (int i = 0; i < n_; ++i)
      if (axes_[i] == a) return i;
    return std::nullopt;
  }
  /// Extent of axis `a` (1 when the mesh does not have it).
  constexpr int size(Axis a) const noexcept {
    auto i = find(a);
    return i ? extents_[*i] : 1;
  }
  /// Coordinates of `rank` (offset ≤ rank < offset + rank_count()).
  constexpr MeshCoord coord(int rank) const noexcept {
    MeshCoord c;
    int const r = rank - offset_;
    for (int i = 0; i < n_; ++i) c[axes_[i]] = (r / strides_[i]) % extents_[i];
    return c;
  }
  /// The rank at coordinates `c` (inverse of `coord`).
  constexpr int rank(MeshCoord const& c) const noexcept {
    int r = offset_;
    for (int i = 0; i < n_; ++i) r += c[axes_[i]] * strides_[i];
    return r;
  }
  /// All groups in which the axes of `varying` vary and the others are fixed.
  constexpr GroupFamily groups(AxisSet varying) const noexcept;

 private:
  int n_ = 0;
  std::array<Axis, kMaxMeshAxes> axes_{};
  std::array<int, kMaxMeshAxes> extents_{};
  std::array<int, kMaxMeshAxes> strides_{};
  int count_ = 1;
  int offset_ = 0;
};

/// The groups of a mesh along a set of varying axes, in Megatron's order
/// (`generate_masked_orthogonal_rank_groups`): group `g` fixes the other axes to the mixed-radix
/// digits of `g`, first fixed axis fastest. Groups are computed lazily.
class GroupFamily {
 public:
  constexpr GroupFamily(ProcessMesh const& mesh, AxisSet varying) noexcept {
    for (int i = 0; i < mesh.axis_count(); ++i) {
      if (varying.contains(mesh.axis(i))) {
        in_extents_[n_in_] = mesh.extent(i);
        in_strides_[n_in_++] = mesh.stride(i);
      } else {
        out_extents_[n_out_] = mesh.extent(i);
        out_strides_[n_out_++] = mesh.stride(i);
      }
    }
    offset_ = mesh.offset();
    for (int i = 0; i < n_out_; ++i) count_ *= out_extents_[i];
  }

  /// Number of groups.
  constexpr int count() const noexcept { return count_; }
  /// Members per group.
  constexpr int group_size() const noexcept { return group(0).size(); }
  /// Group `g` (0 ≤ g < count()).
  constexpr RankGroup group(int g) const noexcept {
    int base = offset_;
    for (int i = 0; i < n_out_; ++i) {
      base += (g % out_extents_[i]) * out_strides_[i];
      g /= out_extents_[i];
    }
    return RankGroup(n_in_, in_extents_, in_strides_, base);
  }
  constexpr RankGroup operator[](int g) const noexcept { return group(g); }
  /// Index of the group holding `rank`.
  constexpr int index_containing(int rank) const noexcept {
    int const r = rank - offset_;
    int g = 0;
    int radix = 1;
    for (int i = 0; i < n_out_; ++i) {
      g += ((r / out_strides_[i]) % out_extents_[i]) * radix;
      radix *= out_extents_[i];
    }
    return g;
  }
  /// The group holding `rank`.
  constexpr RankGroup containing(int rank) const noexcept { return group(index_containing(rank)); }
  /// Every group as a list of ranks, in order.
  std::vector<std::vector<int>> lists() const {
    std::vector<std::vector<int>> out;
    out.reserve(static_cast<std::size_t>(count_));
    for (int g = 0; g < count_; ++g) out.push_back(group(g).ranks());
    return out;
  }

 private:
  int n_in_ = 0, n_out_ = 0;
  std::array<int, kMaxMeshAxes> in_extents_{}, in_strides_{}, out_extents_{}, out_strides_{};
  int offset_ = 0;
  int count_ = 1;
};

constexpr GroupFamily ProcessMesh::groups(AxisSet varying) const noexcept {
  return GroupFamily(*this, varying);
}

}  // namespace v0
}  // namespace moefold
