#include "groups_svg.hpp"

#include <algorithm>

#include <fmt/format.h>

namespace moefold::cli {
namespace {

constexpr int kCellW = 70;
constexpr int kCellH = 46;
constexpr int kMargin = 20;
constexpr int kTitleH = 28;

/// A light fill for EP group `i` out of `n` in a stage: hues spread over the circle.
std::string fill(int i, int n) {
  return fmt::format("hsl({},70%,82%)", (i * 360) / std::max(n, 1));
}

struct Grid {
  int columns, rows;
};

/// One rank's cell: its number, and the coordinates of the other layout.
void cell(std::string& out, int x, int y, int rank, std::string const& color,
          std::string const& label) {
  out += fmt::format(
      "<rect x='{}' y='{}' width='{}' height='{}' fill='{}' stroke='#555' stroke-width='1'/>\n", x,
      y, kCellW, kCellH, color);
  out += fmt::format(
      "<text x='{}' y='{}' font-size='15' font-weight='bold' text-anchor='middle'>{}</text>\n",
      x + kCellW / 2, y + 19, rank);
  out += fmt::format("<text x='{}' y='{}' font-size='10' text-anchor='middle'>{}</text>\n",
                     x + kCellW / 2, y + 36, label);
}

}  // namespace

std::string groups_svg(FoldedMapping const& f) {
  // Attention grid: columns tp + TP·cp, rows dp. MoE grid: columns etp + ETP·ep, rows edp.
  Grid const att{f.tp() * f.cp(), f.dp()};
  Grid const moe{f.etp() * f.ep(), f.edp()};
  // Each grid's area is wide enough for its title.
  int const att_w = std::max(att.columns * kCellW, 430);
  int const moe_w = std::max(moe.columns * kCellW, 400);
  int const stage_h = kTitleH + std::max(att.rows, moe.rows) * kCellH + kMargin;
  int const width = 2 * kMargin + att_w + 3 * kMargin + moe_w;
  int const legend_h = 58;
  int const height = kMargin + f.pp() * stage_h + legend_h;

  std::string out = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif'>\n"
      "<rect width='100%' height='100%' fill='white'/>\n",
      width, height);
  int const eps_per_stage = f.etp() * f.edp();  // number of EP groups in one stage
  auto ep_index = [&](int rank) {
    auto const c = f.moe_coord(rank);
    return c[Axis::etp] + f.etp() * c[Axis::edp];
  };

  for (int stage = 0; stage < f.pp(); ++stage) {
    int const top = kMargin + stage * stage_h;
    int const att_x = kMargin;
    int const moe_x = kMargin + att_w + 3 * kMargin;
    out += fmt::format(
        "<text x='{}' y='{}' font-size='13'>stage {}: attention TP{}·CP{}·DP{} (columns tp, cp; "
        "rows dp)</text>\n",
        att_x, top + 16, stage, f.tp(), f.cp(), f.dp());
    out += fmt::format(
        "<text x='{}' y='{}' font-size='13'>MoE ETP{}·EP{}·EDP{} (columns etp, ep; rows "
        "edp)</text>\n",
        moe_x, top + 16, f.etp(), f.ep(), f.edp());
    for (int rank = 0; rank < f.world_size(); ++rank) {
      auto const a = f.attention_coord(rank);
      if (a[Axis::pp] != stage) continue;
      auto const m = f.moe_coord(rank);
      std::string const color = fill(ep_index(rank), eps_per_stage);
      cell(out, att_x + (a[Axis::tp] + f.tp() * a[Axis::cp]) * kCellW,
           top + kTitleH + a[Axis::dp] * kCellH, rank, color,
           fmt::format("ep{} etp{}", m[Axis::ep], m[Axis::etp]));
      cell(out, moe_x + (m[Axis::etp] + f.etp() * m[Axis::ep]) * kCellW,
           top + kTitleH + m[Axis::edp] * kCellH, rank, color,
           fmt::format("tp{} cp{} dp{}", a[Axis::tp], a[Axis::cp], a[Axis::dp]));
    }
    // Heavy outlines: TP groups in the attention grid, ETP groups in the MoE grid.
    for (int col = 0; col < att.columns; col += f.tp())
      for (int row = 0; row < att.rows; ++row)
        out += fmt::format(
            "<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='black' "
            "stroke-width='3'/>\n",
            att_x + col * kCellW, top + kTitleH + row * kCellH, f.tp() * kCellW, kCellH);
    for (int col = 0; col < moe.columns; col += f.etp())
      for (int row = 0; row < moe.rows; ++row)
        out += fmt::format(
            "<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='black' "
            "stroke-width='3'/>\n",
            moe_x + col * kCellW, top + kTitleH + row * kCellH, f.etp() * kCellW, kCellH);
  }
  int const ly = kMargin + f.pp() * stage_h;
  out += fmt::format(
      "<text x='{}' y='{}' font-size='12'>Fill colour = EP group (token all-to-all); the same "
      "rank has the same colour in both grids.</text>\n",
      kMargin, ly + 14);
  out += fmt::format(
      "<text x='{}' y='{}' font-size='12'>Heavy outline = TP group (attention) and ETP group "
      "(MoE). An EP group spread over several</text>\n",
      kMargin, ly + 32);
  out += fmt::format(
      "<text x='{}' y='{}' font-size='12'>attention columns or rows is folded across CP or "
      "DP.</text>\n</svg>\n",
      kMargin, ly + 50);
  return out;
}

}  // namespace moefold::cli
