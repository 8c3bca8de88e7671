#pragma once
/// \file
/// Order strings (`tp-cp-ep-dp-pp`): which parallel axis varies fastest in the rank layout,
/// parsed and normalized exactly as Megatron-Core's `RankGenerator` does.

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>
#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {

/// An axis name of an order string. The same string serves both generators: on the MoE side
/// `tp` means ETP and `dp` means EDP, as in Megatron.
enum class OrderAxis : std::uint8_t { tp, cp, ep, dp, pp, gtp_remat };

constexpr std::string_view name(OrderAxis a) noexcept {
  constexpr std::array<std::string_view, 6> names{"tp", "cp", "ep", "dp", "pp", "gtp_remat"};
  return names[static_cast<std::size_t>(a)];
}

/// Megatron's default order.
inline constexpr std::string_view kDefaultOrder = "tp-cp-ep-dp-pp";

/// A parsed order string: lower-cased, every name known and present once.
class Order {
 public:
  /// Parses `text` (case-insensitive). Throws `invalid_config` naming an unknown, empty or
  /// repeated axis.
  static Order parse(std::string_view text) {
    Order o;
    o.text_.reserve(text.size());
    for (char ch : text) o.text_ += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    std::string_view rest = o.text_;
    while (true) {
      auto const dash = rest.find('-');
      std::string_view const token = rest.substr(0, dash);
      auto axis = from_name(token);
      if (!axis) {
        throw invalid_config(fmt::format(
            "order '{}': unknown axis name '{}' (allowed names: tp, cp, ep, dp, pp, gtp_remat, "
            "joined by '-')",
            o.text_, token));
      }
      if (o.contains(*axis)) {
        throw invalid_config(fmt::format("order '{}': axis '{}' appears more than once", o.text_,
                                         token));
      }
      o.axes_.push_back(*axis);
      if (dash == std::string_view::npos) break;
      rest.remove_prefix(dash + 1);
    }
    return o;
  }

  /// The order as given, lower-cased.
  std::string const& text() const noexcept { return text_; }
  /// The axes in the order given, fastest first.
  std::vector<OrderAxis> const& axes() const noexcept { return axes_; }
  bool contains(OrderAxis a) const noexcept {
    return std::find(axes_.begin(), axes_.end(), a) != axes_.end();
  }
  /// True when the last axis is `pp` (Megatron's "pp-last rank ordering").
  bool ends_with_pp() const noexcept { return !axes_.empty() && axes_.back() == OrderAxis::pp; }

  /// Megatron's normalization for one generator whose axis sizes are `size_of(axis)`: axes that
  /// the string leaves out are appended at the end in the sequence tp, pp, dp, ep, cp; leaving
  /// out an axis whose size is not 1 is an error that names it. `side` names the generator in
  /// the message ("attention" or "MoE").
  template <class SizeOf>
  std::vector<OrderAxis> normalized(SizeOf size_of, std::string_view side) const {
    std::vector<OrderAxis> out = axes_;
    for (OrderAxis a : {OrderAxis::tp, OrderAxis::pp, OrderAxis::dp, OrderAxis::ep, OrderAxis::cp}) {
      if (contains(a)) continue;
      int const size = size_of(a);
      if (size != 1) {
        throw invalid_config(fmt::format(
            "order '{}' leaves out axis '{}', whose size in the {} layout is {}; only axes of "
            "size 1 may be left out",
            text_, name(a), side, size));
      }
      out.push_back(a);
    }
    return out;
  }

 private:
  static std::optional<OrderAxis> from_name(std::string_view s) noexcept {
    for (OrderAxis a : {OrderAxis::tp, OrderAxis::cp, OrderAxis::ep, OrderAxis::dp, OrderAxis::pp,
                        OrderAxis::gtp_remat})
      if (s == name(a)) return a;
    return std::nullopt;
  }

  std::string text_;
  std::vector<OrderAxis> axes_;
};

}  // namespace v0
}  // namespace moefold
