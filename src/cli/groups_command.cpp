#include "groups_command.hpp"

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "groups_svg.hpp"
#include "input.hpp"
#include "moefold/core/error.hpp"

namespace moefold::cli {

namespace {
/// Largest world `moefold groups` prints: 2^20 ranks make a ~134 MB table.
constexpr int kMaxGroupRanks = 1 << 20;
/// Largest world drawn with --svg, and the SVG bytes per rank (two cells of three elements).
constexpr int kMaxSvgRanks = 4096;
constexpr double kSvgBytesPerRank = 800;
struct GroupsOptions {
  FoldingConfig folding;
  std::optional<int> rank;
  std::optional<std::string> svg_path;
  bool json = false;
};
int run_groups(GroupsOptions const& o);
}  // namespace

void add_folding_flags(CLI::App& cmd, FoldingConfig& f, bool world_required) {
  // Type and int range only: FoldedMapping::from names the broken rule for sizes below 1.
  constexpr long lo = std::numeric_limits<int>::min(), hi = std::numeric_limits<int>::max();
  add_integer(cmd, "--world-size", f.world, lo, hi, "Number of ranks (W)")
      ->required(world_required);
  add_integer(cmd, "--tensor-model-parallel-size,--tp", f.tp, lo, hi,
              "Attention tensor parallel size")
      ->default_str(std::to_string(f.tp));
  add_integer(cmd, "--context-parallel-size,--cp", f.cp, lo, hi, "Attention context parallel size")
      ->default_str(std::to_string(f.cp));
  add_integer(cmd, "--pipeline-model-parallel-size,--pp", f.pp, lo, hi, "Pipeline parallel size")
      ->default_str(std::to_string(f.pp));
  add_integer(cmd, "--expert-model-parallel-size,--ep", f.ep, lo, hi, "Expert parallel size")
      ->default_str(std::to_string(f.ep));
  add_integer(cmd, "--expert-tensor-parallel-size,--etp", f.etp, lo, hi,
              "Expert tensor parallel size (default: equal to TP, as in Megatron)");
  cmd.add_option("--order", f.order, "Rank order, fastest axis first")->capture_default_str();
  add_integer(cmd, "--num-distributed-optimizer-instances", f.num_distributed_optimizer_instances,
              lo, hi, "Distributed-optimizer instances")
      ->default_str(std::to_string(f.num_distributed_optimizer_instances));
}

Command add_groups_command(CLI::App& app) {
  auto options = std::make_shared<GroupsOptions>();
  GroupsOptions& o = *options;
  CLI::App* cmd = app.add_subcommand("groups", "Print the process groups of a folding");
  add_folding_flags(*cmd, o.folding);
  add_integer(*cmd, "--rank", o.rank, std::numeric_limits<int>::min(),
              std::numeric_limits<int>::max(), "Show one rank's coordinates and groups");
  cmd->add_option_function<std::string>(
      "--svg", [&o](std::string const& path) { o.svg_path = path; },
      "Write a picture of the folding to this SVG file");
  cmd->add_flag("--json", o.json, "Print the groups as JSON (config and groups only)");
  return {cmd, [options] { return run_groups(*options); }};
}

namespace {

std::string list(std::vector<int> const& v) { return fmt::format("[{}]", fmt::join(v, ",")); }

/// One line of JSON, written group by group so that only one kind's groups are in memory at a
/// time (and no string holds the whole document).
void print_json(FoldedMapping const& fold) {
  nlohmann::ordered_json config;
  config["world_size"] = fold.world_size();
  config["tp"] = fold.tp();
  config["cp"] = fold.cp();
  config["dp"] = fold.dp();
  config["pp"] = fold.pp();
  config["ep"] = fold.ep();
  config["etp"] = fold.etp();
  config["edp"] = fold.edp();
  config["order"] = fold.order();
  config["num_distributed_optimizer_instances"] = fold.num_distributed_optimizer_instances();
  fmt::print("{{\"config\":{},\"groups\":{{", config.dump());
  char const* separator = "";
  for (Group g : fold.catalogue()) {
    fmt::print("{}\"{}\":[", separator, name(g));
    char const* comma = "";
    for (auto const& members : fold.groups(g)) {
      fmt::print("{}{}", comma, list(members));
      comma = ",";
    }
    fmt::print("]");
    separator = ",";
  }
  fmt::print("}}}}\n");
}

void print_header(FoldedMapping const& f) {
  fmt::print(
      "folding of {} ranks (order {}):\n"
      "  attention  TP{} x CP{} x DP{} x PP{}\n"
      "  MoE        ETP{} x EP{} x EDP{} x PP{}\n",
      f.world_size(), f.order(), f.tp(), f.cp(), f.dp(), f.pp(), f.etp(), f.ep(), f.edp(), f.pp());
  if (f.num_distributed_optimizer_instances() > 1)
    fmt::print("  distributed-optimizer instances: {}\n", f.num_distributed_optimizer_instances());
}

void print_table(FoldedMapping const& fold) {
  print_header(fold);
  fmt::print("\n{:<24} {:>6} {:>5}  members\n", "group", "groups", "size");
  for (Group g : fold.catalogue()) {
    auto const groups = fold.groups(g);
    std::string members;
    for (auto const& m : groups) members += list(m) + " ";
    fmt::print("{:<24} {:>6} {:>5}  {}\n", name(g), groups.size(), groups.front().size(), members);
  }
}

void print_rank(FoldedMapping const& fold, int rank) {
  print_header(fold);
  auto const a = fold.attention_coord(rank);
  auto const m = fold.moe_coord(rank);
  fmt::print("\nrank {}\n  attention coordinates: tp {}, cp {}, dp {}, pp {}\n", rank, a[Axis::tp],
             a[Axis::cp], a[Axis::dp], a[Axis::pp]);
  fmt::print("  MoE coordinates:       etp {}, ep {}, edp {}, pp {}\n\n", m[Axis::etp], m[Axis::ep],
             m[Axis::edp], m[Axis::pp]);
  fmt::print("{:<24} {:>10}  members\n", "group", "rank in it");
  for (Group g : fold.catalogue()) {
    auto const members = fold.group_of(g, rank);
    if (members.empty()) {
      fmt::print("{:<24} {:>10}  (not a member)\n", name(g), "-");
      continue;
    }
    fmt::print("{:<24} {:>10}  {}\n", name(g), *fold.rank_in_group(g, rank), list(members));
  }
}

/// Bytes of text the group table (or JSON) of a W-rank folding takes: every group kind lists
/// every rank once, each as up to `digits(W) + 1` characters.
double table_bytes(long world, int kinds) {
  return double(kinds) * double(world) * double(fmt::formatted_size("{},", world - 1));
}

/// Checks the sizes before any work: the world must fit the output that was asked for.
void check_size(FoldingConfig const& f, GroupsOptions const& o) {
  if (f.world > kMaxGroupRanks)
    throw invalid_config(fmt::format(
        "--world-size {}: the group table would need ~{:.1f} GB ({} group kinds x {} ranks); at "
        "most {} ranks are supported (the largest clusters have ~10^5 GPUs, and a table of 2^20 "
        "ranks is already ~{:.0f} MB)",
        f.world, table_bytes(f.world, kCoreGroupCount) / 1e9, kCoreGroupCount, f.world,
        kMaxGroupRanks, table_bytes(kMaxGroupRanks, kCoreGroupCount) / 1e6));
  if (o.svg_path && f.world > kMaxSvgRanks)
    throw invalid_config(fmt::format(
        "--svg: a picture of {} ranks would take ~{:.0f} MB (two cells per rank); at most {} "
        "ranks are drawn",
        f.world, f.world * kSvgBytesPerRank / 1e6, kMaxSvgRanks));
}

int run_groups(GroupsOptions const& o) {
  if (o.svg_path && o.svg_path->empty())
    throw error(errc::invalid_argument, "--svg needs a file name (got '')");
  check_size(o.folding, o);
  FoldedMapping const fold = FoldedMapping::from(o.folding);
  if (o.rank && (*o.rank < 0 || *o.rank >= fold.world_size())) {
    throw invalid_config(
        fmt::format("--rank {} is outside the world of size {}", *o.rank, fold.world_size()));
  }
  if (o.svg_path) write_text_file("--svg", *o.svg_path, groups_svg(fold));
  if (o.json) {
    print_json(fold);
  } else if (o.rank) {
    print_rank(fold, *o.rank);
  } else {
    print_table(fold);
  }
  return 0;
}

}  // namespace

}  // namespace moefold::cli
