#pragma once
/// \file
/// `detail::format_message`: the small formatter behind `MOEFOLD_EXPECTS`, so that the headers
/// under core/, exec/ and ops/ compile under nvcc without fmt. It replaces each `{}` with the
/// next argument (integers in decimal, floating point in the shortest round-trip form, strings
/// as they are, bool as true/false) and `{{`/`}}` with a brace; format specifications are not
/// supported (host code that needs them uses fmt).

#include <charconv>
#include <concepts>
#include <string>
#include <string_view>
#include <type_traits>

namespace moefold {
inline namespace v0 {
namespace detail {

template <class A>
void append_formatted(std::string& out, A const& a) {
  using D = std::remove_cvref_t<A>;
  if constexpr (std::is_same_v<D, bool>) {
    out += a ? "true" : "false";
  } else if constexpr (std::is_same_v<D, char>) {
    out += a;
  } else if constexpr (std::is_integral_v<D> || std::is_floating_point_v<D>) {
    char buf[64];
    auto const r = std::to_chars(buf, buf + sizeof buf, a);
    out.append(buf, r.ptr);
  } else if constexpr (std::is_enum_v<D>) {
    append_formatted(out, static_cast<std::underlying_type_t<D>>(a));
  } else if constexpr (std::is_convertible_v<A const&, std::string_view>) {
    out += std::string_view(a);
  } else {
    static_assert(std::is_convertible_v<A const&, std::string_view>,
                  "format_message: unsupported argument type");
  }
}

/// `fmt::format` for `{}` placeholders only.
template <class... Args>
std::string format_message(std::string_view f, Args const&... args) {
  std::string out;
  out.reserve(f.size() + 16 * sizeof...(Args));
  std::size_t pos = 0;
  [[maybe_unused]] auto next = [&](auto const& a) {
    while (pos < f.size()) {
      char const c = f[pos];
      if (c == '{' && pos + 1 < f.size() && f[pos + 1] == '{') {
        out += '{';
        pos += 2;
      } else if (c == '}' && pos + 1 < f.size() && f[pos + 1] == '}') {
        out += '}';
        pos += 2;
      } else if (c == '{' && pos + 1 < f.size() && f[pos + 1] == '}') {
        pos += 2;
        append_formatted(out, a);
        return;
      } else {
        out += c;
        ++pos;
      }
    }
  };
  (next(args), ...);
  while (pos < f.size()) {
    char const c = f[pos];
    if ((c == '{' || c == '}') && pos + 1 < f.size() && f[pos + 1] == c) ++pos;
    out += c;
    ++pos;
  }
  return out;
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
