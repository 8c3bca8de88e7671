#include "schedule_command.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "input.hpp"
#include "moefold/core/error.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/pipeline/pipeline_schedule.hpp"
#include "moefold/pipeline/simulation.hpp"
#include "schedule_svg.hpp"

namespace moefold::cli {

namespace {
/// Largest schedule: 2^20 forward and backward computations (a text timeline of ~20 MB; a
/// pipeline of 1024 stages with 512 micro-batches each).
constexpr long kMaxComputations = 1L << 20;
constexpr double kBytesPerComputation = 300;  // simulation records, labels and timeline text
/// Largest schedule drawn with --svg, and the SVG bytes per computation (a box and a label).
constexpr long kMaxSvgComputations = 1L << 16;
constexpr double kSvgBytesPerComputation = 200;
struct ScheduleOptions {
  int pp = 1;
  int microbatches = 1;
  std::optional<int> vpp;
  std::optional<int> group_size;
  std::optional<std::string> svg_path;
  bool json = false;
};
int run_schedule(ScheduleOptions const& o);
}  // namespace

Command add_schedule_command(CLI::App& app) {
  auto options = std::make_shared<ScheduleOptions>();
  ScheduleOptions& o = *options;
  CLI::App* cmd = app.add_subcommand(
      "schedule", "Print a pipeline schedule (1F1B, or interleaved with --vpp >= 2) per stage");
  // Type and int range here; the schedules' validate() names the rule for sizes below 1.
  constexpr long lo = std::numeric_limits<int>::min(), hi = std::numeric_limits<int>::max();
  add_integer(*cmd, "--pipeline-model-parallel-size,--pp", o.pp, lo, hi, "Pipeline stages (PP)")
      ->required();
  add_integer(*cmd, "--num-microbatches,--microbatches", o.microbatches, lo, hi,
              "Microbatches per step on each stage (M)")
      ->required();
  add_integer(*cmd, "--num-virtual-stages-per-pipeline-rank,--vpp", o.vpp, lo, hi,
              "Model chunks per stage (VPP); 2 or more selects the interleaved schedule");
  add_integer(*cmd, "--microbatch-group-size-per-vp-stage,--microbatch-group-size", o.group_size,
              lo, hi,
              "Interleaved only: microbatches per chunk before switching chunk (default PP)");
  cmd->add_option_function<std::string>(
      "--svg", [&o](std::string const& path) { o.svg_path = path; },
      "Write the timeline to this SVG file");
  cmd->add_flag("--json", o.json, "Print {\"per_rank\": {rank: {warmup, ops}}}");
  return {cmd, [options] { return run_schedule(*options); }};
}

namespace {

template <PipelineSchedule S>
std::vector<std::string> op_labels(S const& s, int stage) {
  std::vector<std::string> out;
  for (auto const& a : s.compute_order(stage)) out.push_back(to_string(a, s.num_chunks() > 1));
  return out;
}

template <PipelineSchedule S>
void print_json(S const& s) {
  nlohmann::ordered_json per_rank = nlohmann::ordered_json::object();
  for (int r = 0; r < s.num_stages(); ++r) {
    nlohmann::ordered_json rank;
    rank["warmup"] = s.warmup(r);
    rank["ops"] = op_labels(s, r);
    per_rank[std::to_string(r)] = std::move(rank);
  }
  nlohmann::ordered_json doc;
  doc["per_rank"] = std::move(per_rank);
  fmt::print("{}\n", doc.dump());
}

/// One stage's row: each clock unit is `unit` characters; an op shows its label, padded with '-'
/// to its length and closed by '|'; idle units are dots.
std::string timeline_row(std::vector<TimedAction> const& ops, int makespan, int unit,
                         bool with_chunk) {
  std::string row;
  int clock = 0;
  for (TimedAction const& t : ops) {
    row.append(static_cast<std::size_t>((t.start - clock) * unit), '.');
    std::string cell = to_string(t.action, with_chunk);
    std::size_t const width = static_cast<std::size_t>((t.end - t.start) * unit);
    cell.resize(width - 1, '-');
    row += cell + '|';
    clock = t.end;
  }
  row.append(static_cast<std::size_t>((makespan - clock) * unit), '.');
  return row;
}

template <PipelineSchedule S>
void print_text(S const& s, std::string const& title, PipelineTimeline const& tl,
                std::string const& ideal) {
  bool const with_chunk = s.num_chunks() > 1;
  fmt::print("{}\n\n{:<6} {:>6}  ops\n", title, "stage", "warmup");
  std::size_t longest = 0;
  for (int r = 0; r < s.num_stages(); ++r) {
    auto const labels = op_labels(s, r);
    for (auto const& l : labels) longest = std::max(longest, l.size());
    fmt::print("{:<6} {:>6}  {}\n", r, s.warmup(r), fmt::join(labels, " "));
  }
  int const unit = static_cast<int>(longest) + 1;
  fmt::print(
      "\ntimeline (logical clock: forward 1 unit, backward 2 units; {} characters per unit, "
      "'.' idle)\n",
      unit);
  for (int r = 0; r < s.num_stages(); ++r)
    fmt::print("stage {:<3} {}\n", r,
               timeline_row(tl.stages[static_cast<std::size_t>(r)], tl.makespan, unit, with_chunk));
  fmt::print("\n{:<6} {:>6} {:>6}\n", "stage", "busy", "idle");
  for (int r = 0; r < s.num_stages(); ++r)
    fmt::print("{:<6} {:>6} {:>6}\n", r, tl.busy[static_cast<std::size_t>(r)],
               tl.idle[static_cast<std::size_t>(r)]);
  fmt::print("makespan {} units; idle fraction {}/{} = {:.4f} (ideal {})\n", tl.makespan,
             tl.total_idle(), static_cast<long>(s.num_stages()) * tl.makespan, tl.idle_fraction(),
             ideal);
}

template <PipelineSchedule S>
int show(S const& s, ScheduleOptions const& o, std::string const& title, std::string const& ideal) {
  s.validate();
  if (o.json) {
    print_json(s);
  }
  if (!o.json || o.svg_path) {
    PipelineTimeline const tl = simulate(s, {}, SendMode::rendezvous);
    if (o.svg_path)
      write_text_file("--svg", *o.svg_path, schedule_svg(tl, title, s.num_chunks() > 1));
    if (!o.json) print_text(s, title, tl, ideal);
  }
  return 0;
}

/// Checks the size before any work: 2·PP·VPP·M computations, each a few hundred bytes in the
/// simulation, the text timeline and the SVG.
void check_size(ScheduleOptions const& o) {
  if (o.pp < 1 || o.microbatches < 1 || o.vpp.value_or(1) < 1) return;  // validate() says why
  double const computations = 2.0 * o.pp * o.vpp.value_or(1) * o.microbatches;
  if (computations > kMaxComputations)
    throw invalid_config(fmt::format(
        "PP·VPP·M = {}·{}·{}: the schedule has {:.0f} computations and would need ~{:.1f} GB to "
        "simulate and print; at most {} computations (forward and backward) are supported",
        o.pp, o.vpp.value_or(1), o.microbatches, computations,
        computations * kBytesPerComputation / 1e9, kMaxComputations));
  if (o.svg_path && computations > kMaxSvgComputations)
    throw invalid_config(fmt::format(
        "--svg: a timeline of {:.0f} computations would take ~{:.0f} MB; at most {} are drawn",
        computations, computations * kSvgBytesPerComputation / 1e6, kMaxSvgComputations));
}

int run_schedule(ScheduleOptions const& o) {
  if (o.svg_path && o.svg_path->empty())
    throw error(errc::invalid_argument, "--svg needs a file name (got '')");
  check_size(o);
  if (o.vpp && *o.vpp < 1)
    throw invalid_config(
        fmt::format("--num-virtual-stages-per-pipeline-rank must be at least 1 (got {})", *o.vpp));
  bool const interleaved = o.vpp && *o.vpp >= 2;
  if (o.group_size && !interleaved)
    throw invalid_config(
        "--microbatch-group-size-per-vp-stage needs the interleaved schedule "
        "(--num-virtual-stages-per-pipeline-rank >= 2)");
  if (!interleaved) {
    OneFOneB const s{.stages = o.pp, .microbatches = o.microbatches};
    s.validate();
    return show(s, o, fmt::format("1F1B schedule: PP {}, M {}", o.pp, o.microbatches),
                fmt::format("(PP-1)/(M+PP-1) = {}/{} = {:.4f}", o.pp - 1, o.microbatches + o.pp - 1,
                            s.ideal_bubble_fraction()));
  }
  Interleaved const s{.stages = o.pp,
                      .virtual_stages = *o.vpp,
                      .microbatches = o.microbatches,
                      .microbatch_group_size = o.group_size};
  s.validate();
  return show(s, o,
              fmt::format("interleaved 1F1B schedule: PP {}, VPP {}, M {}, group size {}", o.pp,
                          *o.vpp, o.microbatches, s.group_size()),
              fmt::format("(PP-1)/(VPP*M+PP-1) = {}/{} = {:.4f}", o.pp - 1,
                          *o.vpp * o.microbatches + o.pp - 1, s.ideal_bubble_fraction()));
}

}  // namespace

}  // namespace moefold::cli
