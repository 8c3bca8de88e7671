#include "schedule_svg.hpp"

#include <algorithm>
#include <cstddef>

#include <fmt/format.h>

namespace moefold::cli {
namespace {

constexpr int kUnitW = 26;   // pixels per clock unit
constexpr int kRowH = 34;    // pixels per stage row
constexpr int kLabelW = 70;  // left column with "stage p"
constexpr int kMargin = 20;
constexpr int kTitleH = 30;

/// Forwards in blues, backwards in oranges; a lighter shade for each later chunk.
std::string fill(PipelineAction const& a) {
  int const light = std::min(55 + 12 * a.chunk, 90);
  return a.op == PipelineOp::forward ? fmt::format("hsl(210,70%,{}%)", light)
                                     : fmt::format("hsl(30,85%,{}%)", light);
}

}  // namespace

std::string schedule_svg(PipelineTimeline const& tl, std::string const& title, bool with_chunk) {
  int const stages = static_cast<int>(tl.stages.size());
  int const width = 2 * kMargin + kLabelW + std::max(tl.makespan, 1) * kUnitW;
  int const legend_h = 40;
  int const height = kMargin + kTitleH + stages * kRowH + kRowH + legend_h;
  std::string out = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif'>\n"
      "<rect width='100%' height='100%' fill='white'/>\n"
      "<text x='{}' y='{}' font-size='14'>{}</text>\n",
      width, height, kMargin, kMargin + 14, title);
  int const x0 = kMargin + kLabelW;
  int const y0 = kMargin + kTitleH;
  for (int s = 0; s < stages; ++s) {
    int const y = y0 + s * kRowH;
    out += fmt::format("<text x='{}' y='{}' font-size='13'>stage {}</text>\n", kMargin,
                       y + kRowH / 2 + 5, s);
    out +=
        fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='#f4f4f4' stroke='#ccc'/>\n",
                    x0, y + 2, tl.makespan * kUnitW, kRowH - 4);
    for (TimedAction const& t : tl.stages[static_cast<std::size_t>(s)]) {
      int const x = x0 + t.start * kUnitW;
      int const w = (t.end - t.start) * kUnitW;
      out += fmt::format(
          "<rect x='{}' y='{}' width='{}' height='{}' fill='{}' stroke='#333'/>\n"
          "<text x='{}' y='{}' font-size='{}' text-anchor='middle'>{}</text>\n",
          x, y + 2, w, kRowH - 4, fill(t.action), x + w / 2, y + kRowH / 2 + 4, with_chunk ? 9 : 11,
          to_string(t.action, with_chunk));
    }
  }
  // Clock axis, every 5 units.
  int const axis_y = y0 + stages * kRowH + 14;
  for (int t = 0; t <= tl.makespan; t += 5)
    out += fmt::format("<text x='{}' y='{}' font-size='10' text-anchor='middle'>{}</text>\n",
                       x0 + t * kUnitW, axis_y, t);
  out += fmt::format(
      "<text x='{}' y='{}' font-size='12'>Blue = forward (1 unit), orange = backward (2 units); "
      "grey = idle (the bubble: {:.1f}% of stage time). Logical clock, not wall time.</text>\n"
      "</svg>\n",
      kMargin, axis_y + 26, 100.0 * tl.idle_fraction());
  return out;
}

}  // namespace moefold::cli
