#pragma once
/// \file
/// The words of the communicators' fault messages, written once for every backend: how a group,
/// a list of ranks, a timeout and "who arrived" read, e.g.
/// "collective all_to_all_v over group ep (world ranks 0 1 2 3) timed out after 600 s:
/// ranks 0 1 3 arrived, rank 2 did not".

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace moefold {
inline namespace v0 {
namespace detail {

/// Ranks separated by spaces ("0 1 3"); a list longer than 24 keeps its first 16 and last 4
/// ("0 1 … 1023 (1024 ranks)"), so a message stays readable on a large group.
inline std::string rank_list(std::span<int const> ranks) {
  constexpr std::size_t kHead = 16, kTail = 4;
  if (ranks.size() <= 24) return fmt::format("{}", fmt::join(ranks, " "));
  return fmt::format("{} … {} ({} ranks)", fmt::join(ranks.first(kHead), " "),
                     fmt::join(ranks.last(kTail), " "), ranks.size());
}

/// "rank 2" or "ranks 0 1 3".
inline std::string ranks_phrase(std::span<int const> ranks) {
  return fmt::format("{} {}", ranks.size() == 1 ? "rank" : "ranks", rank_list(ranks));
}

/// "group ep (world ranks 0 1 2 3)" for a named group, "the group of world ranks 0 1 2 3"
/// otherwise.
inline std::string group_description(std::string_view name, std::span<int const> world_ranks) {
  if (name.empty()) return fmt::format("the group of world ranks {}", rank_list(world_ranks));
  return fmt::format("group {} (world ranks {})", name, rank_list(world_ranks));
}

/// "600 s" for whole seconds, "1500 ms" otherwise.
inline std::string duration_text(std::chrono::milliseconds d) {
  if (d.count() % 1000 == 0) return fmt::format("{} s", d.count() / 1000);
  return fmt::format("{} ms", d.count());
}

/// "ranks 0 1 3 arrived, rank 2 did not", followed by `notes` (what is known of the ranks that
/// did not arrive, e.g. "rank 2 waits in broadcast instead") after a colon.
inline std::string arrival_text(std::span<int const> arrived, std::span<int const> missing,
                                std::vector<std::string> const& notes = {}) {
  std::string out;
  if (arrived.empty())
    out = fmt::format("no rank arrived, {} did not", ranks_phrase(missing));
  else if (missing.empty())
    out = fmt::format("{} arrived, yet the collective did not complete", ranks_phrase(arrived));
  else
    out = fmt::format("{} arrived, {} did not", ranks_phrase(arrived), ranks_phrase(missing));
  if (!notes.empty()) out += fmt::format(" ({})", fmt::join(notes, "; "));
  return out;
}

}  // namespace detail
}  // namespace v0
}  // namespace moefold
