#include "groups_command.hpp"

#include <fstream>
#include <memory>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "groups_svg.hpp"
#include "moefold/core/error.hpp"

namespace moefold::cli {

namespace {
struct GroupsOptions {
  FoldingConfig folding;
  std::optional<int> rank;
  std::string svg_path;
  bool json = false;
};
int run_groups(GroupsOptions const& o);
}  // namespace

void add_folding_flags(CLI::App& cmd, FoldingConfig& f, bool world_required) {
  cmd.add_option("--world-size", f.world, "Number of ranks (W)")->required(world_required);
  cmd.add_option("--tensor-model-parallel-size,--tp", f.tp, "Attention tensor parallel size")
      ->capture_default_str();
  cmd.add_option("--context-parallel-size,--cp", f.cp, "Attention context parallel size")
      ->capture_default_str();
  cmd.add_option("--pipeline-model-parallel-size,--pp", f.pp, "Pipeline parallel size")
      ->capture_default_str();
  cmd.add_option("--expert-model-parallel-size,--ep", f.ep, "Expert parallel size")
      ->capture_default_str();
  cmd.add_option_function<int>(
      "--expert-tensor-parallel-size,--etp", [&f](int v) { f.etp = v; },
      "Expert tensor parallel size (default: equal to TP, as in Megatron)");
  cmd.add_option("--order", f.order, "Rank order, fastest axis first")->capture_default_str();
  cmd.add_option("--num-distributed-optimizer-instances", f.num_distributed_optimizer_instances,
                 "Distributed-optimizer instances")
      ->capture_default_str();
}

Command add_groups_command(CLI::App& app) {
  auto options = std::make_shared<GroupsOptions>();
  GroupsOptions& o = *options;
  CLI::App* cmd = app.add_subcommand("groups", "Print the process groups of a folding");
  add_folding_flags(*cmd, o.folding);
  cmd->add_option_function<int>(
      "--rank", [&o](int r) { o.rank = r; }, "Show one rank's coordinates and groups");
  cmd->add_option("--svg", o.svg_path, "Write a picture of the folding to this SVG file");
  cmd->add_flag("--json", o.json, "Print the groups as JSON (config and groups only)");
  return {cmd, [options] { return run_groups(*options); }};
}

namespace {

std::string list(std::vector<int> const& v) { return fmt::format("[{}]", fmt::join(v, ",")); }

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
  nlohmann::ordered_json groups = nlohmann::ordered_json::object();
  for (Group g : fold.catalogue()) groups[std::string(name(g))] = fold.groups(g);
  nlohmann::ordered_json doc;
  doc["config"] = std::move(config);
  doc["groups"] = std::move(groups);
  fmt::print("{}\n", doc.dump());
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

int run_groups(GroupsOptions const& o) {
  FoldedMapping const fold = FoldedMapping::from(o.folding);
  if (o.rank && (*o.rank < 0 || *o.rank >= fold.world_size())) {
    throw invalid_config(
        fmt::format("--rank {} is outside the world of size {}", *o.rank, fold.world_size()));
  }
  if (!o.svg_path.empty()) {
    std::ofstream out(o.svg_path);
    if (!out) throw error(errc::invalid_argument, fmt::format("cannot write --svg {}", o.svg_path));
    out << groups_svg(fold);
  }
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
