#pragma once
/// \file
/// The planner's cost model: for a model, a cluster, a workload and one folding (TP, CP, PP,
/// VPP, EP, ETP, micro-batch size, recompute), the step time split into compute, exposed
/// communication per group, pipeline bubble and optimizer; throughput and MFU; memory per GPU.
///
/// Every term is a formula over the shapes (docs/plan.md writes them out). One set of
/// `CostConstants` serves every model; they were calibrated on the paper's Table 1 alone
/// (docs/planner-validation.md).
///
/// Overlap assumptions (Megatron-Core v0.10 with the usual performance flags):
///   - TP (sequence-parallel) all-gather/reduce-scatter: a fraction `tp_overlap` is hidden behind
///     the GEMMs (`--tp-comm-overlap`);
///   - CP ring exchange of K/V: hidden behind the attention kernel of the previous ring step; only
///     the excess and per-step latencies are exposed;
///   - EP all-to-all and ETP all-gather/reduce-scatter inside the MoE layer: not overlapped;
///   - DP (dense, over dp_cp) and EDP (experts, over edp) gradient reduce-scatter: overlapped with
///     the backward of the last micro-batch; the parameter all-gather of the distributed optimizer
///     with the forward of the first one (`--overlap-grad-reduce --overlap-param-gather`);
///   - PP sends: exposed with 1F1B, hidden with the interleaved schedule (`--overlap-p2p-comm`).

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/mesh/folded_mapping.hpp"
#include "moefold/plan/cluster.hpp"
#include "moefold/plan/flops.hpp"
#include "moefold/plan/model.hpp"
#include "moefold/plan/placement.hpp"
#include "moefold/plan/state_memory.hpp"

namespace moefold {
inline namespace v0 {

/// Activation recomputation.
enum class Recompute {
  none,  ///< keep every activation
  full,  ///< keep each layer's input only; rerun the layer's forward in the backward
};

/// The name of a recompute mode ("none", "full").
constexpr std::string_view name(Recompute r) noexcept {
  return r == Recompute::full ? "full" : "none";
}

/// The calibrated constants of the cost model: one set for every model and cluster.
struct CostConstants {
  // Compute.
  double gemm_efficiency = 0.75;  ///< BF16 GEMM throughput / peak for large shapes
  /// GEMM efficiency falls as e / (1 + d0/M + d0/N + d0/K) for an M×N×K GEMM: skinny shapes
  /// (few tokens per expert, ETP-narrowed experts) lose throughput.
  double gemm_half_dim = 256.0;
  double attention_efficiency = 0.55;  ///< flash attention (forward + backward) / peak, long rows
  double attention_half_length = 512;  ///< attention efficiency falls as q / (q + this)
  double hbm_efficiency = 0.8;         ///< achieved / peak HBM bandwidth (element-wise kernels)
  // Communication.
  double nvlink_efficiency = 0.8;       ///< ring all-gather/reduce-scatter bus bandwidth / link
  double all_to_all_efficiency = 0.35;  ///< all-to-all bandwidth inside a node / NVLink
  double network_efficiency = 0.85;     ///< achieved / peak bandwidth of the network port
  double tp_overlap = 0.8;              ///< share of the TP traffic hidden behind GEMMs
  // Overheads.
  double layer_overhead_us = 200.0;  ///< per layer and micro-batch (forward + backward)
  /// Per ring step of context-parallel attention (forward and backward): the extra attention
  /// and output-correction kernel launches and the stream synchronisation of each step.
  double cp_step_overhead_us = 300.0;
  // Memory.
  double memory_reserve_gb = 8.0;         ///< CUDA context, NCCL buffers, workspaces
  double activation_fragmentation = 1.0;  ///< allocator overhead on activations
};

/// The parallel configuration the cost model prices.
struct ParallelConfig {
  int tp = 1;                ///< attention tensor parallel
  int cp = 1;                ///< attention context parallel
  int pp = 1;                ///< pipeline stages
  int vpp = 1;               ///< virtual stages per pipeline rank (1: not interleaved)
  int ep = 1;                ///< expert parallel
  int etp = 1;               ///< expert tensor parallel
  int micro_batch_size = 1;  ///< sequences per micro-batch
  Recompute recompute = Recompute::none;
};

/// The training job: sequences per step and their length, on how many GPUs, and how it keeps
/// its model state (precision, optimizer sharding).
struct Workload {
  int gpus = 1;
  long global_batch_size = 1;
  long seq_length = 4096;
  StatePolicy state{};
};

/// Memory per GPU, in bytes: the model state of the pipeline stage that holds the most
/// (`state_per_stage` lists every stage), the activations of the busiest one.
struct MemoryEstimate {
  double weights = 0;      ///< parameters (BF16 or FP32)
  double gradients = 0;    ///< FP32 (main) gradients
  double optimizer = 0;    ///< Adam moments (and FP32 main weights with BF16), sharded or not
  double activations = 0;  ///< with the configuration's recompute mode
  double activations_without_recompute = 0;
  double activations_with_recompute = 0;
  double reserve = 0;  ///< CUDA context, NCCL, workspaces
  double total() const noexcept { return weights + gradients + optimizer + activations + reserve; }
};

/// Seconds per step spent in each part, on the critical path of one rank.
struct TimeBreakdown {
  double attention_gemm = 0;  ///< QKV and output projection (+ shared expert, router)
  double core_attention = 0;  ///< flash attention, causal
  double expert_gemm = 0;     ///< routed experts' grouped GEMMs
  double output_layer = 0;    ///< vocabulary projection and loss (last stage)
  double elementwise = 0;     ///< norms, activations, permutations: HBM-bound
  double recompute = 0;       ///< forward recomputation, communication included (full recompute)
  double overhead = 0;        ///< launches and host synchronisation per layer
  double tp = 0, cp = 0, ep = 0, etp = 0, pp = 0;  ///< exposed communication per group
  double dp = 0, edp = 0;  ///< exposed gradient reduction / parameter gather
  double bubble = 0;       ///< pipeline bubble
  double optimizer = 0;    ///< optimizer step
  /// Raw (before overlap) time of each communication, per step.
  double tp_raw = 0, cp_raw = 0, dp_raw = 0, edp_raw = 0, pp_raw = 0;
};

/// The cost model's answer for one configuration.
struct Estimate {
  ParallelConfig config;
  int dp = 1;                 ///< attention data parallel
  int edp = 1;                ///< expert data parallel
  bool folded = false;        ///< breaks the pre-folding rule (ETP = TP and EP | DP·CP)
  bool fits = true;           ///< total memory ≤ HBM
  long microbatches = 1;      ///< per pipeline and step
  double flops_per_step = 0;  ///< Megatron v0.10 model FLOPs
  double step_time_s = 0;
  double tokens_per_s_per_gpu = 0;
  double mfu = 0;             ///< fraction of peak
  double tflops_per_gpu = 0;  ///< model TFLOP/s per GPU
  TimeBreakdown time;
  MemoryEstimate memory;
  FoldingPlacement placement;
};

/// True when (tp, cp, dp, ep, etp) breaks the pre-folding rule "ETP = TP and EP divides DP·CP",
/// i.e. needs MoE Parallel Folding.
constexpr bool is_folded(int tp, int cp, int dp, int ep, int etp) noexcept {
  return etp != tp || (dp * cp) % ep != 0;
}

namespace detail {

/// Why `c` cannot run `model` on `w`, or nullopt. Checks the shape rules only; the folding rules
/// (divisibility of the world) belong to `FoldedMapping::from`.
inline std::optional<std::string> shape_violation(ModelSpec const& model, Workload const& w,
                                                  ParallelConfig const& c) {
  if (c.vpp < 1 || c.micro_batch_size < 1)
    return fmt::format("VPP ({}) and micro_batch_size ({}) must be at least 1", c.vpp,
                       c.micro_batch_size);
  if (model.num_attention_heads % c.tp != 0)
    return fmt::format("num_attention_heads ({}) is not divisible by TP ({})",
                       model.num_attention_heads, c.tp);
  if (model.num_query_groups % c.tp != 0)
    return fmt::format("num_query_groups ({}) is not divisible by TP ({})", model.num_query_groups,
                       c.tp);
  if (model.num_experts % c.ep != 0)
    return fmt::format("num_experts ({}) is not divisible by EP ({})", model.num_experts, c.ep);
  if (model.moe_ffn_hidden_size % c.etp != 0)
    return fmt::format("moe_ffn_hidden_size ({}) is not divisible by ETP ({})",
                       model.moe_ffn_hidden_size, c.etp);
  if (model.shared_expert_ffn_hidden_size % c.tp != 0)
    return fmt::format("shared expert width ({}) is not divisible by TP ({})",
                       model.shared_expert_ffn_hidden_size, c.tp);
  if (model.num_layers % c.pp != 0)
    return fmt::format("num_layers ({}) is not divisible by PP ({})", model.num_layers, c.pp);
  if ((model.num_layers / c.pp) % c.vpp != 0)
    return fmt::format("layers per pipeline stage ({}) are not divisible by VPP ({})",
                       model.num_layers / c.pp, c.vpp);
  if (c.vpp > 1 && c.pp == 1) return fmt::format("interleaving (VPP={}) requires PP > 1", c.vpp);
  long const seq_split = long{c.tp} * c.cp * (c.cp > 1 ? 2 : 1);
  if (w.seq_length % seq_split != 0)
    return fmt::format("seq_length ({}) is not divisible by TP·CP{} = {}", w.seq_length,
                       c.cp > 1 ? "·2" : "", seq_split);
  long const tcp = long{c.tp} * c.cp * c.pp;
  if (w.gpus % tcp != 0) return std::nullopt;  // FoldedMapping reports it
  long const dp = w.gpus / tcp;
  if (int const n = w.state.num_distributed_optimizer_instances; n > 1) {
    long const edp = w.gpus % (long{c.ep} * c.etp * c.pp) == 0
                         ? w.gpus / (long{c.ep} * c.etp * c.pp)
                         : n;  // FoldedMapping reports it
    if ((dp * c.cp) % n != 0 || edp % n != 0)
      return fmt::format(
          "DP·CP = {} and EDP = {} must be divisible by num_distributed_optimizer_instances = {}",
          dp * c.cp, edp, n);
  }
  if (w.global_batch_size % (dp * c.micro_batch_size) != 0)
    return fmt::format("global_batch_size ({}) is not divisible by micro_batch_size·DP = {}·{}",
                       w.global_batch_size, c.micro_batch_size, dp);
  long const m = w.global_batch_size / (dp * c.micro_batch_size);
  if (c.vpp > 1 && m % c.pp != 0)
    return fmt::format(
        "the interleaved schedule needs the number of micro-batches ({}) divisible by PP ({})", m,
        c.pp);
  return std::nullopt;
}

}  // namespace detail

/// Parameters one rank of pipeline stage `stage` holds, as `DecoderStage` builds them: its
/// L/PP layers (attention and shared expert sharded over TP; the two norms and the router
/// replicated; E/EP experts sharded over ETP); the embedding on the first stage; the final norm
/// and the output layer (or, tied with PP > 1, the embedding's copy) on the last.
inline StageParams stage_params(ModelSpec const& model, ParallelConfig const& c, int stage) {
  double const tp = c.tp, h = model.hidden_size;
  double const layers = model.num_layers / c.pp;
  double const vocab = double(model.padded_vocab(c.tp)) * h / tp;
  StageParams p;
  p.non_expert =
      layers * ((model.attention_params_per_layer() + model.shared_expert_params_per_layer()) / tp +
                model.replicated_params_per_layer());
  p.expert = layers * (double(model.num_experts) / c.ep) * model.params_per_expert() / c.etp;
  if (stage == 0) p.non_expert += vocab;
  if (stage == c.pp - 1) {
    p.non_expert += h;  // final norm
    if (model.untie_embeddings || c.pp > 1) p.non_expert += vocab;
  }
  return p;
}

/// The parameters of the stage that holds the most (the first or the last: the others hold
/// their layers only).
inline StageParams busiest_stage_params(ModelSpec const& model, ParallelConfig const& c) {
  StageParams const first = stage_params(model, c, 0), last = stage_params(model, c, c.pp - 1);
  return last.total() > first.total() ? last : first;
}

/// Weights, gradients and optimizer state of one rank of pipeline stage `stage` under
/// `w.state`: the rank of the stage's shard groups that keeps the most.
/// Precondition: `folding_of(w, c)` does not throw.
inline StateBytes stage_state(ModelSpec const& model, Workload const& w, ParallelConfig const& c,
                              int stage) {
  long const dp_cp = w.gpus / (long{c.tp} * c.pp);
  long const edp = w.gpus / (long{c.ep} * c.etp * c.pp);
  return state_bytes(stage_params(model, c, stage), dp_cp, edp, w.state);
}

/// `stage_state` of every pipeline stage, stage 0 first.
inline std::vector<StateBytes> state_per_stage(ModelSpec const& model, Workload const& w,
                                               ParallelConfig const& c) {
  std::vector<StateBytes> out;
  for (int s = 0; s < c.pp; ++s) out.push_back(stage_state(model, w, c, s));
  return out;
}

namespace detail {

/// The memory that does not depend on activations (bytes): weights, gradients and optimizer
/// state of the stage that holds the most, and the reserve. A lower bound on any variant's
/// memory: the planner prunes mappings with it before pricing.
inline MemoryEstimate state_memory(ModelSpec const& model, Workload const& w,
                                   ParallelConfig const& c, CostConstants const& k) {
  StateBytes const first = stage_state(model, w, c, 0), last = stage_state(model, w, c, c.pp - 1);
  StateBytes const& most = last.total() > first.total() ? last : first;
  MemoryEstimate mem;
  mem.weights = most.weights;
  mem.gradients = most.gradients;
  mem.optimizer = most.optimizer;
  mem.reserve = 1e9 * k.memory_reserve_gb;
  return mem;
}

/// Prices collectives on a placement.
struct Links {
  ClusterSpec const& cluster;
  CostConstants const& k;

  double latency(GroupPlacement const& p) const noexcept {
    return 1e-6 * (p.intra_node() ? cluster.nvlink_latency_us : cluster.network_latency_us);
  }
  /// Ring bus bandwidth (bytes/s): NVLink inside a node; across nodes every member on a node
  /// drives its own network port.
  double ring_bandwidth(GroupPlacement const& p) const noexcept {
    double const nvl = 1e9 * cluster.nvlink_gb_per_s * k.nvlink_efficiency;
    if (p.intra_node()) return nvl;
    return std::min(nvl, 1e9 * cluster.network_gb_per_s * k.network_efficiency * p.ranks_per_node);
  }
  /// All-gather or reduce-scatter of a `full_bytes` buffer (the gathered size) over `p`.
  double ring(double full_bytes, GroupPlacement const& p) const noexcept {
    if (p.size <= 1) return 0;
    double const n = p.size;
    return full_bytes * (n - 1) / n / ring_bandwidth(p) + latency(p) * std::log2(n);
  }
  /// All-to-all where each member sends `bytes` in total, spread evenly over the members.
  double all_to_all(double bytes, GroupPlacement const& p) const noexcept {
    if (p.size <= 1) return 0;
    double const n = p.size, local = p.ranks_per_node;
    double const intra =
        bytes * (local - 1) / n / (1e9 * cluster.nvlink_gb_per_s * k.all_to_all_efficiency);
    double const inter =
        bytes * (n - local) / n / (1e9 * cluster.network_gb_per_s * k.network_efficiency);
    return std::max(intra, inter) + latency(p);
  }
  /// A point-to-point send of `bytes` between neighbours of `p` (network when `p` spans nodes).
  double send(double bytes, GroupPlacement const& p) const noexcept {
    if (p.size <= 1) return 0;
    double const bw = p.intra_node() ? 1e9 * cluster.nvlink_gb_per_s * k.nvlink_efficiency
                                     : 1e9 * cluster.network_gb_per_s * k.network_efficiency;
    return bytes / bw + latency(p);
  }
};

}  // namespace detail

/// Throws `invalid_config` when `c` cannot run `model` on `w` (shape rules: heads, KV groups,
/// experts, expert width and layers divisible by TP, EP, ETP and PP·VPP; sequence divisible by
/// TP·CP (·2 with CP); global batch divisible by micro-batch·DP; micro-batches divisible by PP
/// when interleaved).
inline void check_shape(ModelSpec const& model, Workload const& w, ParallelConfig const& c) {
  if (auto why = detail::shape_violation(model, w, c)) throw invalid_config(*why);
}

/// The folding `c` describes on `w.gpus` ranks (Megatron's default order); throws
/// `invalid_config` naming the broken rule.
inline FoldedMapping folding_of(Workload const& w, ParallelConfig const& c) {
  return FoldedMapping::from(
      {.world = w.gpus,
       .tp = c.tp,
       .cp = c.cp,
       .pp = c.pp,
       .ep = c.ep,
       .etp = c.etp,
       .num_distributed_optimizer_instances = w.state.num_distributed_optimizer_instances,
       .vpp = c.vpp > 1 ? std::optional<int>(c.vpp) : std::nullopt});
}

/// Prices `c` given the placement of its groups (from `place(folding_of(w, c), ...)`).
/// Preconditions: `check_shape(model, w, c)` and `folding_of(w, c)` do not throw.
inline Estimate estimate(ModelSpec const& model, ClusterSpec const& cluster, Workload const& w,
                         ParallelConfig const& c, FoldingPlacement const& place,
                         CostConstants const& k = {}) {
  Estimate e;
  e.config = c;
  e.placement = place;
  e.dp = w.gpus / (c.tp * c.cp * c.pp);
  e.edp = w.gpus / (c.etp * c.ep * c.pp);
  e.folded = is_folded(c.tp, c.cp, e.dp, c.ep, c.etp);
  e.microbatches = w.global_batch_size / (long{e.dp} * c.micro_batch_size);
  detail::Links const links{cluster, k};

  double const peak = 1e12 * cluster.peak_tflops;
  double const hbm = 1e12 * cluster.hbm_tb_per_s * k.hbm_efficiency;
  double const s = double(w.seq_length), b = c.micro_batch_size;
  double const h = model.hidden_size, d = model.head_dim();
  double const a = model.num_attention_heads, g = model.num_query_groups;
  double const F = model.moe_ffn_hidden_size, Fs = model.shared_expert_ffn_hidden_size;
  double const E = model.num_experts, topk = model.moe_router_topk, f1 = model.fc1_factor();
  double const V = double(model.padded_vocab(c.tp));
  double const tp = c.tp, cp = c.cp, ep = c.ep, etp = c.etp;
  int const layers = model.num_layers / c.pp;  // per pipeline rank
  double const M = double(e.microbatches);

  // Tokens on one rank per micro-batch: the attention GEMMs see the CP shard (gathered over TP);
  // everything else sees the sequence-parallel shard.
  double const t_attn = b * s / cp;
  double const t_loc = t_attn / tp;
  double const copies = t_loc * topk;  // routed token copies a rank sends (and receives)
  double const local_experts = E / ep;
  double const m_expert = copies * etp / local_experts;  // rows per local expert after ETP gather

  auto gemm = [&](double m, double n, double kk) {
    if (m <= 0 || n <= 0 || kk <= 0) return 0.0;
    double const eff =
        k.gemm_efficiency / (1 + k.gemm_half_dim / m + k.gemm_half_dim / n + k.gemm_half_dim / kk);
    return 2 * m * n * kk / (peak * eff);
  };

  // ---- Compute per layer and micro-batch, forward.
  double const attn_gemm_f = gemm(t_attn, (a + 2 * g) * d / tp, h) + gemm(t_attn, h, a * d / tp) +
                             gemm(t_attn, f1 * Fs / tp, h) + gemm(t_attn, h, Fs / tp) +
                             gemm(t_loc, E, h);
  double const expert_f =
      local_experts * (gemm(m_expert, f1 * F / etp, h) + gemm(m_expert, h, F / etp));
  double const chunk = c.cp > 1 ? s / (2 * cp) : s;  // query rows per attention kernel call
  double const attn_eff = k.attention_efficiency * chunk / (chunk + k.attention_half_length);
  double const core_f = 4 * b * (s * s / 2) * (a / tp) * d / cp / (peak * attn_eff);
  double const elem_bytes_f =
      2 * (t_loc * h * 10                       // two norms, two residual adds
           + t_attn * (a + 2 * g) * d / tp * 2  // rotary embedding on q, k
           + copies * h * 2 + t_loc * h * 2     // permute and unpermute
           + copies * (f1 + 1) * F              // activation function
           + (c.ep > 1 && local_experts > 1 ? 4 * copies * etp * h : 0)  // chunk sort, unsort
           + t_attn * (f1 + 1) * Fs / tp);                               // shared expert activation
  double const elem_f = elem_bytes_f / hbm;

  // ---- Communication per layer and micro-batch (forward + backward), raw.
  double const act_bytes = t_attn * h * 2;  // the gathered [s/CP, b, h] activation in BF16
  double const tp_raw = (Fs > 0 ? 8 : 4) * links.ring(act_bytes, place.tp);
  double const kv_bytes = 2 * t_attn * std::max(1.0, g / tp) * d * 2;
  double const cp_raw = 3 * (cp - 1) * links.send(kv_bytes, place.cp);
  double const ep_f = 2 * links.all_to_all(copies * h * 2, place.ep);
  double const etp_f = 2 * links.ring(copies * etp * h * 2, place.etp);

  double const gemm_f = attn_gemm_f + expert_f;
  double const core_total = 3.5 * core_f;  // backward = 2.5 × forward
  double const tp_exposed = (1 - k.tp_overlap) * tp_raw;
  double const cp_exposed =
      c.cp > 1 ? std::max(0.0, cp_raw - core_total) +
                     3 * (cp - 1) * (links.latency(place.cp) + 1e-6 * k.cp_step_overhead_us)
               : 0.0;
  double const recompute_f =
      c.recompute == Recompute::full
          ? gemm_f + core_f + elem_f + ep_f + etp_f + (tp_raw + cp_raw) / 3 * (1 - k.tp_overlap)
          : 0.0;
  double const overhead = 1e-6 * k.layer_overhead_us;
  double const layer_time = 3 * gemm_f + core_total + 3 * elem_f + tp_exposed + cp_exposed +
                            2 * ep_f + 2 * etp_f + recompute_f + overhead;

  // ---- Output layer and loss on the last stage, per micro-batch.
  double const output_time = 3 * gemm(t_attn, V / tp, h) + 3 * (t_attn * V / tp * 4 * 3) / hbm +
                             (1 - k.tp_overlap) * 2 * links.ring(act_bytes, place.tp);
  // ---- Pipeline sends per micro-batch: activation forward, gradient backward, per chunk.
  double const pp_raw = c.pp > 1 ? 2 * c.vpp * links.send(t_loc * h * 2, place.pp) : 0.0;
  double const pp_exposed = c.vpp > 1 ? 2 * c.vpp * links.latency(place.pp) : pp_raw;

  double const stage_time = layers * layer_time + output_time + pp_exposed;
  double const bubble = (c.pp - 1) / double(c.vpp) * stage_time;

  // ---- Parameters per rank (the stage holding the embedding or output layer).
  StageParams const stage = busiest_stage_params(model, c);
  double const dense_params = stage.non_expert, expert_params = stage.expert;
  StatePolicy const& policy = w.state;

  // ---- Gradient reduction (FP32) and parameter gather, per step: with the distributed
  // optimizer a reduce-scatter of the gradients and an all-gather of the updated weights;
  // without it an all-reduce of the gradients (reduce-scatter + all-gather, in the backward).
  double const grad_passes = policy.use_distributed_optimizer ? 1.0 : 2.0;
  double const gather_bytes = policy.use_distributed_optimizer ? policy.weight_bytes() : 0.0;
  double const dp_rs = grad_passes * links.ring(4 * dense_params, place.dp_cp);
  double const dp_ag = links.ring(gather_bytes * dense_params, place.dp_cp);
  double const edp_rs = grad_passes * links.ring(4 * expert_params, place.edp);
  double const edp_ag = links.ring(gather_bytes * expert_params, place.edp);
  double const window_b = stage_time * 2 / 3, window_f = stage_time / 3;
  double const rs_exposed = std::max(0.0, dp_rs + edp_rs - window_b);
  double const ag_exposed = std::max(0.0, dp_ag + edp_ag - window_f);
  double const rs_share = dp_rs + edp_rs > 0 ? dp_rs / (dp_rs + edp_rs) : 0.0;
  double const ag_share = dp_ag + edp_ag > 0 ? dp_ag / (dp_ag + edp_ag) : 0.0;
  double const shard_params = policy.use_distributed_optimizer
                                  ? dense_params / (e.dp * cp) + expert_params / e.edp
                                  : dense_params + expert_params;
  // Bytes per element: read grad, (master,) weight, m, v; write them back (and cast, BF16).
  double const optimizer = shard_params * (policy.bf16 ? 32.0 : 28.0) / hbm;

  e.step_time_s = M * stage_time + bubble + rs_exposed + ag_exposed + optimizer;

  // ---- Breakdown (seconds per step on the critical path).
  double const per_layer_steps = M * layers;
  TimeBreakdown& t = e.time;
  t.attention_gemm = per_layer_steps * 3 * attn_gemm_f;
  t.expert_gemm = per_layer_steps * 3 * expert_f;
  t.core_attention = per_layer_steps * core_total;
  t.elementwise = per_layer_steps * 3 * elem_f;
  t.recompute = per_layer_steps * recompute_f;
  t.overhead = per_layer_steps * overhead;
  t.output_layer = M * output_time;
  t.tp = per_layer_steps * tp_exposed;
  t.cp = per_layer_steps * cp_exposed;
  t.ep = per_layer_steps * 2 * ep_f;
  t.etp = per_layer_steps * 2 * etp_f;
  t.pp = M * pp_exposed;
  t.dp = rs_exposed * rs_share + ag_exposed * ag_share;
  t.edp = rs_exposed * (1 - rs_share) + ag_exposed * (1 - ag_share);
  t.bubble = bubble;
  t.optimizer = optimizer;
  t.tp_raw = per_layer_steps * tp_raw;
  t.cp_raw = per_layer_steps * cp_raw;
  t.pp_raw = M * pp_raw;
  t.dp_raw = dp_rs + dp_ag;
  t.edp_raw = edp_rs + edp_ag;

  // ---- Throughput.
  e.flops_per_step = megatron_flops_per_step(model, w.global_batch_size, w.seq_length, c.tp);
  e.tokens_per_s_per_gpu = double(w.global_batch_size) * s / (e.step_time_s * w.gpus);
  e.tflops_per_gpu = e.flops_per_step / (e.step_time_s * w.gpus) / 1e12;
  e.mfu = e.tflops_per_gpu / cluster.peak_tflops;

  // ---- Memory per GPU (bytes).
  MemoryEstimate& mem = e.memory;
  mem = detail::state_memory(model, w, c, k);
  // Activations are kept in the weights' type: the BF16 figures below, doubled for FP32.
  double const act_factor = k.activation_fragmentation * policy.weight_bytes() / 2;
  // Activations of one layer and micro-batch.
  double const attn_act = t_loc * 4 * h  // norm input, QKV input
                          + t_attn * (2 * (a + 2 * g) * d + 2 * a * d + 4 * a) / tp  // q,k,v,o,lse
                          + (Fs > 0 ? t_loc * 2 * h + t_attn * 2 * (f1 + 1) * Fs / tp : 0.0);
  double const moe_act = t_loc * (4 * h + 8 * E)      // norm and router inputs, logits, probs
                         + copies * etp * 2 * h       // fc1 input after the ETP gather
                         + copies * 2 * (f1 + 1) * F  // fc1 output and activation output
                         + copies * 2 * h;            // expert outputs (probability gradient)
  double const layer_act = attn_act + moe_act;
  double const layer_input = t_loc * h * 2;
  // Layers of activations the first stage holds at its peak.
  double const chunk_layers = double(layers) / c.vpp;
  double in_flight = 0;
  if (c.vpp == 1) {
    in_flight = std::min<double>(c.pp, M) * layers;
  } else {
    double const warmup = 2.0 * (c.pp - 1) + double(c.vpp - 1) * c.pp + 1;
    in_flight = std::min(warmup, M * c.vpp) * chunk_layers;
  }
  double const logits = c.pp == 1 ? t_attn * V / tp * 6 : 0.0;  // last stage: see below
  mem.activations_without_recompute = act_factor * (in_flight * layer_act + logits);
  mem.activations_with_recompute = act_factor * (in_flight * layer_input + layer_act + logits);
  // The last stage holds fewer micro-batches but the logits.
  if (c.pp > 1) {
    double const last_in_flight =
        c.vpp == 1 ? layers : (double(c.vpp - 1) * c.pp + 1) * chunk_layers;
    double const last_logits = t_attn * V / tp * 6;
    mem.activations_without_recompute = std::max(
        mem.activations_without_recompute, act_factor * (last_in_flight * layer_act + last_logits));
    mem.activations_with_recompute =
        std::max(mem.activations_with_recompute,
                 act_factor * (last_in_flight * layer_input + layer_act + last_logits));
  }
  mem.activations = c.recompute == Recompute::full ? mem.activations_with_recompute
                                                   : mem.activations_without_recompute;
  e.fits = mem.total() <= 1e9 * cluster.hbm_gb;
  return e;
}

/// Checks `c` (shape and folding rules; throws `invalid_config`) and prices it.
inline Estimate estimate(ModelSpec const& model, ClusterSpec const& cluster, Workload const& w,
                         ParallelConfig const& c, CostConstants const& k = {}) {
  model.validate();
  cluster.validate();
  w.state.validate();
  check_shape(model, w, c);
  FoldedMapping const fold = folding_of(w, c);
  return estimate(model, cluster, w, c, place(fold, cluster.gpus_per_node), k);
}

}  // namespace v0
}  // namespace moefold
