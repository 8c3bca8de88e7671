#include "plan_command.hpp"

#include <chrono>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "groups_command.hpp"
#include "input.hpp"
#include "moefold/core/error.hpp"
#include "moefold/plan/planner.hpp"
#include "plan_json.hpp"

namespace moefold::cli {

namespace {

struct PlanOptions {
  std::string model;
  std::string cluster = "h100";
  std::optional<long> gpus;
  std::optional<long> global_batch_size;
  std::optional<long> seq_length;
  int top = 10;
  bool json = false;
  bool explain = false;
  bool all_variants = false;
  FoldingConfig folding;  // --explain
  std::optional<int> vpp;
  std::optional<int> micro_batch_size;
  std::optional<std::string> recompute;
  CLI::Option* world_size = nullptr;
  StatePolicy state;  // --bf16/--fp32, --use-distributed-optimizer, --runtime
};

int run_plan(PlanOptions const& o);

}  // namespace

Command add_plan_command(CLI::App& app) {
  auto options = std::make_shared<PlanOptions>();
  PlanOptions& o = *options;
  CLI::App* cmd = app.add_subcommand(
      "plan", "Rank the foldings of a model on N GPUs by predicted throughput (or --explain one)");
  cmd->add_option("--model", o.model,
                  "Model preset (mixtral-8x22b, llama3-8x70b, qwen2-57b-a14b, "
                  "mixtral-8x22b-g8t8) or JSON file")
      ->required();
  constexpr long kMaxInt = std::numeric_limits<int>::max();
  add_integer(*cmd, "--gpus", o.gpus, 1, kMaxInt, "Number of GPUs");
  add_integer(*cmd, "--global-batch-size", o.global_batch_size, 1, kMaxInt,
              "Sequences per training step");
  add_integer(*cmd, "--seq-length", o.seq_length, 1, kMaxInt,
              "Tokens per sequence (default: the model's)");
  cmd->add_option("--cluster", o.cluster, "Cluster preset (h100, h200) or JSON file")
      ->capture_default_str();
  add_integer(*cmd, "--top", o.top, 1, kMaxInt, "How many configurations to list")
      ->default_str(std::to_string(o.top));
  cmd->add_flag("--json", o.json, "Print JSON");
  cmd->add_flag("--all-variants", o.all_variants,
                "List every (VPP, micro-batch, recompute) variant, not only the best per mapping");
  cmd->add_flag("--explain", o.explain,
                "Print the cost breakdown of the folding given by the size flags");
  add_folding_flags(*cmd, o.folding, /*world_required=*/false);
  o.world_size = cmd->get_option("--world-size");
  cmd->add_flag_function(
      "--bf16,!--fp32", [&o](std::int64_t n) { o.state.bf16 = n > 0; },
      "Precision: BF16 mixed precision (default, the paper's runs) or FP32");
  cmd->add_flag("--use-distributed-optimizer,!--no-use-distributed-optimizer",
                o.state.use_distributed_optimizer,
                "Shard the optimizer state over dp_cp and edp (default: on, the paper's runs)");
  cmd->add_option_function<std::string>(
         "--runtime",
         [&o](std::string const& v) {
           if (v == "megatron") {
             o.state.runtime = Runtime::megatron;
           } else if (v == "moefold") {
             o.state.runtime = Runtime::moefold;
           } else {
             throw invalid_config(
                 fmt::format("--runtime must be megatron or moefold (got '{}')", v));
           }
         },
         "Whose buffers the memory counts: megatron (default) or moefold (moefold-train: the "
         "distributed optimizer keeps the reduced gradient shards in buffers of their own)")
      ->type_name("NAME");
  add_integer(*cmd, "--virtual-pipeline-model-parallel-size,--vpp", o.vpp, 1, kMaxInt,
              "--explain: virtual pipeline stages per rank (default: the best)");
  add_integer(*cmd, "--micro-batch-size", o.micro_batch_size, 1, kMaxInt,
              "--explain: sequences per micro-batch (default: the best)");
  cmd->add_option_function<std::string>(
      "--recompute", [&o](std::string const& v) { o.recompute = v; },
      "--explain: none or full (default: none when it fits)");
  return {cmd, [options] { return run_plan(*options); }};
}

namespace {

double gb(double bytes) { return bytes / 1e9; }

nlohmann::ordered_json to_json(Estimate const& e, PlanRequest const& r) {
  nlohmann::ordered_json j;
  j["tp"] = e.config.tp;
  j["cp"] = e.config.cp;
  j["pp"] = e.config.pp;
  j["vpp"] = e.config.vpp;
  j["ep"] = e.config.ep;
  j["etp"] = e.config.etp;
  j["dp"] = e.dp;
  j["edp"] = e.edp;
  j["micro_batch_size"] = e.config.micro_batch_size;
  j["mfu"] = e.mfu;
  j["tokens_per_s_per_gpu"] = e.tokens_per_s_per_gpu;
  j["memory_gb"] = gb(e.memory.total());
  j["folded"] = e.folded;
  j["recompute"] = std::string(name(e.config.recompute));
  j["fits"] = e.fits;
  j["step_time_s"] = e.step_time_s;
  j["tflops_per_gpu"] = e.tflops_per_gpu;
  auto const& t = e.time;
  j["breakdown_s"] = {{"attention_gemm", t.attention_gemm},
                      {"core_attention", t.core_attention},
                      {"expert_gemm", t.expert_gemm},
                      {"output_layer", t.output_layer},
                      {"elementwise", t.elementwise},
                      {"recompute", t.recompute},
                      {"overhead", t.overhead},
                      {"tp", t.tp},
                      {"cp", t.cp},
                      {"ep", t.ep},
                      {"etp", t.etp},
                      {"dp", t.dp},
                      {"edp", t.edp},
                      {"pp", t.pp},
                      {"bubble", t.bubble},
                      {"optimizer", t.optimizer}};
  auto const& m = e.memory;
  j["memory_breakdown_gb"] = {
      {"weights", gb(m.weights)},
      {"gradients", gb(m.gradients)},
      {"optimizer", gb(m.optimizer)},
      {"activations", gb(m.activations)},
      {"activations_without_recompute", gb(m.activations_without_recompute)},
      {"activations_with_recompute", gb(m.activations_with_recompute)},
      {"reserve", gb(m.reserve)}};
  // Exact bytes of one rank of each pipeline stage (the largest of its shard groups).
  j["state_per_stage_bytes"] = nlohmann::ordered_json::array();
  for (StateBytes const& b : state_per_stage(r.model, r.workload, e.config))
    j["state_per_stage_bytes"].push_back(
        {{"weights", b.weights}, {"gradients", b.gradients}, {"optimizer", b.optimizer}});
  return j;
}

std::string folding_label(Estimate const& e) {
  return fmt::format("TP{} CP{} PP{} VPP{} EP{} ETP{} (DP{} EDP{}) mbs {}", e.config.tp,
                     e.config.cp, e.config.pp, e.config.vpp, e.config.ep, e.config.etp, e.dp, e.edp,
                     e.config.micro_batch_size);
}

double compute_time(TimeBreakdown const& t) {
  return t.attention_gemm + t.core_attention + t.expert_gemm + t.output_layer + t.elementwise +
         t.recompute + t.overhead;
}

std::string where(GroupPlacement const& p) {
  if (p.size <= 1) return "-";
  if (p.intra_node()) return fmt::format("{} ranks in 1 node (NVLink)", p.size);
  return fmt::format("{} ranks over {} nodes ({} per node, network)", p.size, p.nodes,
                     p.ranks_per_node);
}

void print_header(PlanRequest const& r) {
  fmt::print(
      "model {} ({:.1f}B parameters, {:.1f}B active) on {} x {} ({} GB), global batch {} x "
      "{} tokens\n",
      r.model.name, r.model.total_params() / 1e9, r.model.active_params() / 1e9, r.workload.gpus,
      r.cluster.name, r.cluster.hbm_gb, r.workload.global_batch_size, r.workload.seq_length);
  fmt::print("model FLOPs per step (Megatron v0.10 formula, TP1 vocabulary): {:.4g}\n",
             megatron_flops_per_step(r.model, r.workload.global_batch_size, r.workload.seq_length));
  StatePolicy const& s = r.workload.state;
  fmt::print("model state: {}, {}, {} buffers\n",
             s.bf16 ? "BF16 weights, FP32 main gradients, FP32 main weights and moments"
                    : "FP32 weights, gradients and moments",
             s.use_distributed_optimizer
                 ? fmt::format("distributed optimizer ({} instance{})",
                               s.num_distributed_optimizer_instances,
                               s.num_distributed_optimizer_instances > 1 ? "s" : "")
                 : std::string("optimizer state on every replica"),
             name(s.runtime));
}

void print_breakdown(Estimate const& e, PlanRequest const& r) {
  ClusterSpec const& cluster = r.cluster;
  auto const& t = e.time;
  auto const& m = e.memory;
  fmt::print("folding {}, recompute {}: {}\n", folding_label(e), name(e.config.recompute),
             e.folded ? "folded (breaks ETP = TP and EP | DP·CP)" : "not folded");
  fmt::print(
      "  step {:.3f} s   MFU {:.1f}%   {:.1f} TFLOP/s/GPU   {:.0f} tokens/s/GPU   "
      "{} micro-batches per step\n",
      e.step_time_s, 100 * e.mfu, e.tflops_per_gpu, e.tokens_per_s_per_gpu, e.microbatches);
  auto row = [&](std::string_view what, double s, std::string_view note = "") {
    fmt::print("    {:<22} {:>8.3f} s {:>6.1f}%  {}\n", what, s, 100 * s / e.step_time_s, note);
  };
  fmt::print("  compute (critical path, seconds per step):\n");
  row("attention GEMMs", t.attention_gemm, "QKV, projection, shared expert, router");
  row("core attention", t.core_attention, "flash attention, causal");
  row("expert GEMMs", t.expert_gemm, "grouped GEMM of the local experts");
  row("output layer + loss", t.output_layer, "last pipeline stage");
  row("element-wise", t.elementwise, "norms, activations, permutations (HBM)");
  row("recompute", t.recompute);
  row("overheads", t.overhead, "launches, host syncs");
  fmt::print("  communication (exposed; placement from the mesh algebra):\n");
  auto const& p = e.placement;
  row("tp  all-gather/RS", t.tp, fmt::format("raw {:.3f} s; {}", t.tp_raw, where(p.tp)));
  row("cp  K/V ring", t.cp, fmt::format("raw {:.3f} s; {}", t.cp_raw, where(p.cp)));
  row("ep  all-to-all", t.ep, where(p.ep));
  row("etp all-gather/RS", t.etp, where(p.etp));
  row("dp  grads over dp_cp", t.dp, fmt::format("raw {:.3f} s; {}", t.dp_raw, where(p.dp_cp)));
  row("edp grads over edp", t.edp, fmt::format("raw {:.3f} s; {}", t.edp_raw, where(p.edp)));
  row("pp  sends", t.pp, fmt::format("raw {:.3f} s; {}", t.pp_raw, where(p.pp)));
  fmt::print("  schedule:\n");
  row("pipeline bubble", t.bubble,
      fmt::format("(PP-1)/VPP = {:.2f} stage times", (e.config.pp - 1) / double(e.config.vpp)));
  row("optimizer step", t.optimizer);
  fmt::print(
      "  memory per GPU: {:.1f} GB of {} GB ({}): weights {:.1f}, gradients {:.1f}, "
      "optimizer {:.1f}, activations {:.1f} (without recompute {:.1f}, with full "
      "recompute {:.1f}), reserve {:.1f}\n",
      gb(m.total()), cluster.hbm_gb, e.fits ? "fits" : "DOES NOT FIT", gb(m.weights),
      gb(m.gradients), gb(m.optimizer), gb(m.activations), gb(m.activations_without_recompute),
      gb(m.activations_with_recompute), gb(m.reserve));
  auto const stages = state_per_stage(r.model, r.workload, e.config);
  fmt::print("  model state per pipeline stage (one rank, GB):\n");
  for (std::size_t i = 0, j = 0; i < stages.size(); i = j) {  // equal neighbours on one line
    auto same = [&](StateBytes const& a, StateBytes const& b) {
      return a.weights == b.weights && a.gradients == b.gradients && a.optimizer == b.optimizer;
    };
    while (j < stages.size() && same(stages[j], stages[i])) ++j;
    fmt::print("    stage {:<7} weights {:.4f}  gradients {:.4f}  optimizer {:.4f}\n",
               j - i > 1 ? fmt::format("{}-{}", i, j - 1) : std::to_string(i),
               gb(stages[i].weights), gb(stages[i].gradients), gb(stages[i].optimizer));
  }
}

void print_row(int rank, Estimate const& e) {
  auto const& t = e.time;
  fmt::print(
      "{:>4} {:>3} {:>3} {:>3} {:>3} {:>3} {:>3} {:>4} {:>4} {:>3} {:>4}  {:>5.1f} {:>7.0f} "
      "{:>6.1f} {:>6}  {:>6.2f} {:>5.2f} {:>5.2f} {:>5.2f} {:>5.2f} {:>5.2f} {:>5.2f} "
      "{:>5.2f} {:>6.2f}\n",
      rank, e.config.tp, e.config.cp, e.config.pp, e.config.vpp, e.config.ep, e.config.etp, e.dp,
      e.edp, e.config.micro_batch_size, name(e.config.recompute), 100 * e.mfu,
      e.tokens_per_s_per_gpu, gb(e.memory.total()), e.folded ? "yes" : "no", compute_time(t),
      t.tp + t.cp, t.ep, t.etp, t.dp + t.edp, t.pp, t.bubble, t.optimizer, e.step_time_s);
}

void print_table_header() {
  fmt::print(
      "{:>4} {:>3} {:>3} {:>3} {:>3} {:>3} {:>3} {:>4} {:>4} {:>3} {:>4}  {:>5} {:>7} "
      "{:>6} {:>6}  {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}\n",
      "rank", "TP", "CP", "PP", "VPP", "EP", "ETP", "DP", "EDP", "MBS", "RC", "MFU%", "tok/s",
      "mem GB", "folded", "comp s", "tp+cp", "ep", "etp", "dp", "pp", "bub", "opt", "step s");
}

/// Most GPUs planned for: 2^24, a hundred times the largest clusters built; the mesh algebra
/// behind each folding's placement is linear in the world.
constexpr long kMaxPlanGpus = 1L << 24;

/// Checks the GPU count before any work: within what the model can use, then within what the
/// tool supports.
void check_gpus(PlanRequest const& r, std::string_view flag = "--gpus") {
  if (r.workload.gpus < 1)
    throw invalid_config(fmt::format("{} must be at least 1 (got {})", flag, r.workload.gpus));
  if (auto why = too_many_gpus(r.model, r.workload)) throw invalid_config(*why);
  if (r.workload.gpus > kMaxPlanGpus)
    throw invalid_config(fmt::format(
        "{} {}: at most {} GPUs are supported (FoldedMapping checks each folding rank by rank)",
        flag, r.workload.gpus, kMaxPlanGpus));
}

int run_explain(PlanOptions const& o, PlanRequest r) {
  FoldingConfig f = o.folding;
  bool const world_given = o.world_size->count() > 0;
  if (!world_given && !o.gpus)
    throw invalid_config("--explain needs the number of GPUs: give --gpus or --world-size");
  if (world_given && o.gpus && *o.gpus != f.world)
    throw invalid_config(
        fmt::format("--gpus ({}) and --world-size ({}) disagree", *o.gpus, f.world));
  if (!world_given) f.world = static_cast<int>(*o.gpus);
  r.workload.gpus = f.world;
  check_gpus(r, world_given ? "--world-size" : "--gpus");
  FoldedMapping const fold = FoldedMapping::from(f);  // validates sizes and order
  FoldingPlacement const placement = place(fold, r.cluster.gpus_per_node);

  std::vector<int> vpps, mbss;
  if (o.vpp) {
    vpps = {*o.vpp};
  } else {
    for (int v : detail::divisors(r.model.num_layers / fold.pp()))
      if (fold.pp() > 1 || v == 1) vpps.push_back(v);
  }
  if (o.micro_batch_size) {
    mbss = {*o.micro_batch_size};
  } else {
    for (int b = 1; b <= r.max_micro_batch_size; ++b) mbss.push_back(b);
  }
  std::vector<Recompute> rcs;
  if (o.recompute) {
    if (*o.recompute == "none") {
      rcs = {Recompute::none};
    } else if (*o.recompute == "full") {
      rcs = {Recompute::full};
    } else {
      throw invalid_config(
          fmt::format("--recompute must be none or full (got '{}')", *o.recompute));
    }
  } else {
    rcs = {Recompute::none, Recompute::full};
  }
  std::optional<Estimate> best;
  std::optional<std::string> first_violation;
  for (int vpp : vpps)
    for (int mbs : mbss)
      for (Recompute rc : rcs) {
        ParallelConfig const c{.tp = fold.tp(),
                               .cp = fold.cp(),
                               .pp = fold.pp(),
                               .vpp = vpp,
                               .ep = fold.ep(),
                               .etp = fold.etp(),
                               .micro_batch_size = mbs,
                               .recompute = rc};
        if (auto why = detail::shape_violation(r.model, r.workload, c)) {
          if (!first_violation) first_violation = why;
          continue;
        }
        Estimate e = estimate(r.model, r.cluster, r.workload, c, placement, r.constants);
        bool const better =
            !best || (e.fits && !best->fits) || (e.fits == best->fits && detail::better(e, *best));
        if (better) best = std::move(e);
      }
  if (!best) throw invalid_config(*first_violation);
  if (o.json) {
    fmt::print("{}\n", to_json(*best, r).dump());
  } else {
    print_header(r);
    print_breakdown(*best, r);
  }
  return 0;
}

int run_plan(PlanOptions const& o) {
  PlanRequest r{.model = load_model(o.model), .cluster = load_cluster(o.cluster)};
  r.best_per_mapping = !o.all_variants;
  if (!o.global_batch_size) throw invalid_config("--global-batch-size is required");
  r.workload.global_batch_size = *o.global_batch_size;
  r.workload.seq_length = o.seq_length.value_or(r.model.seq_length);
  r.workload.state = o.state;
  r.workload.state.num_distributed_optimizer_instances =
      o.folding.num_distributed_optimizer_instances;
  r.workload.state.validate();
  if (o.explain) return run_explain(o, r);
  if (!o.gpus) throw invalid_config("--gpus is required");
  r.workload.gpus = static_cast<int>(*o.gpus);
  check_gpus(r);

  auto const start = std::chrono::steady_clock::now();
  PlanResult const result = plan(r);
  double const ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::size_t const shown = std::min<std::size_t>(result.ranked.size(), std::size_t(o.top));

  if (o.json) {
    nlohmann::ordered_json doc;
    doc["configs"] = nlohmann::ordered_json::array();
    for (std::size_t i = 0; i < shown; ++i) doc["configs"].push_back(to_json(result.ranked[i], r));
    doc["best_unfolded"] =
        result.best_unfolded ? to_json(*result.best_unfolded, r) : nlohmann::ordered_json(nullptr);
    fmt::print("{}\n", doc.dump());
    return 0;
  }
  print_header(r);
  fmt::print(
      "{} foldings ({} dropped by a memory lower bound), {} configurations priced, {} fit in "
      "memory; {} cost-model evaluations in {:.0f} ms\n\n",
      result.mappings, result.pruned_by_memory, result.configurations, result.fitting,
      result.evaluations, ms);
  if (result.mappings == 0) {
    fmt::print(
        "no folding of {} GPUs meets the model's rules: TP divides num_attention_heads ({}) and "
        "num_query_groups ({}), PP divides num_layers ({}), DP divides the global batch ({}), "
        "TP·CP(·2) divides seq_length ({}), EP divides num_experts ({}), ETP divides "
        "moe_ffn_hidden_size ({}), and TP·CP·DP·PP = ETP·EP·EDP·PP = {}\n",
        r.workload.gpus, r.model.num_attention_heads, r.model.num_query_groups, r.model.num_layers,
        r.workload.global_batch_size, r.workload.seq_length, r.model.num_experts,
        r.model.moe_ffn_hidden_size, r.workload.gpus);
    return 0;
  }
  if (result.ranked.empty()) {
    fmt::print("no configuration fits in {} GB per GPU\n", r.cluster.hbm_gb);
    return 0;
  }
  print_table_header();
  for (std::size_t i = 0; i < shown; ++i) print_row(int(i) + 1, result.ranked[i]);
  if (result.best_unfolded) {
    fmt::print("\nbest non-folded (ETP = TP and EP | DP·CP):\n");
    print_row(0, *result.best_unfolded);
    fmt::print("folding gain: {:.2f}x\n",
               result.best_unfolded->step_time_s / result.ranked.front().step_time_s);
  } else {
    fmt::print("\nno non-folded configuration fits\n");
  }
  fmt::print("\n#1 in detail:\n");
  print_breakdown(result.ranked.front(), r);
  return 0;
}

}  // namespace

}  // namespace moefold::cli
