#include "options.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <limits>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "moefold/config.hpp"
#include "moefold/core/error.hpp"
#include "preflight.hpp"
#include "tokenizer.hpp"

#ifndef MOEFOLD_DEFAULT_DATA_PATH
#define MOEFOLD_DEFAULT_DATA_PATH "/usr/share/games/fortunes"
#endif

namespace moefold::train_demo {

FoldingConfig TrainOptions::folding() const {
  FoldingConfig f{.world = world,
                  .tp = tp,
                  .cp = cp,
                  .pp = pp,
                  .ep = ep,
                  .etp = etp,
                  .num_distributed_optimizer_instances = num_distributed_optimizer_instances};
  if (vpp > 1) f.vpp = vpp;
  return f;
}

ParseResult parse_options(int argc, char** argv) {
  TrainOptions o;
  CLI::App app{
      "moefold-train: a folded 5-D training run of a small Mixtral-style model on byte-level "
      "English text (Debian's fortunes). Flags carry Megatron's names."};
  std::optional<int> world, tp, cp, pp, ep, etp;
  std::string backend = "inproc";
  auto size = [&](char const* flag, std::optional<int>& v, char const* help) {
    app.add_option_function<int>(
        flag, [&v](int x) { v = x; }, help);
  };
  size("--world-size", world, "Number of ranks (inproc; with mpi: the MPI size)");
  size("--tensor-model-parallel-size,--tp", tp, "Attention tensor parallel size (TP)");
  size("--context-parallel-size,--cp", cp, "Attention context parallel size (CP)");
  size("--pipeline-model-parallel-size,--pp", pp, "Pipeline parallel size (PP)");
  size("--expert-model-parallel-size,--ep", ep, "Expert parallel size (EP)");
  size("--expert-tensor-parallel-size,--etp", etp, "Expert tensor parallel size (ETP)");
  app.add_option("--num-virtual-stages-per-pipeline-rank,--vpp", o.vpp,
                 "Model chunks per pipeline rank (interleaved 1F1B when > 1)")
      ->capture_default_str();
  app.add_option("--num-layers", o.num_layers)->capture_default_str();
  app.add_option("--hidden-size", o.hidden)->capture_default_str();
  app.add_option("--num-attention-heads", o.heads)->capture_default_str();
  app.add_option("--num-query-groups", o.kv_groups)->capture_default_str();
  app.add_option("--num-experts", o.num_experts)->capture_default_str();
  app.add_option("--moe-router-topk", o.topk)->capture_default_str();
  app.add_option("--moe-ffn-hidden-size", o.moe_ffn)->capture_default_str();
  app.add_option("--moe-shared-expert-intermediate-size", o.shared_expert_ffn,
                 "Shared expert size (0: no shared expert)")
      ->capture_default_str();
  app.add_flag("--moe-shared-expert-overlap", o.shared_expert_overlap,
               "Run the shared expert while the token all-to-all is in flight (needs a shared "
               "expert; same results)");
  app.add_option("--rotary-base", o.rotary_base, "Base of the rotary position embeddings")
      ->capture_default_str();
  app.add_option("--norm-epsilon", o.norm_epsilon, "Epsilon of every RMSNorm")
      ->capture_default_str();
  app.add_flag("--add-qkv-bias", o.add_qkv_bias,
               "A bias on the attention's QKV projection (Qwen2-MoE's attention)");
  app.add_option("--moe-router-score-function", o.score_function, "softmax | sigmoid")
      ->capture_default_str();
  app.add_flag("--moe-router-pre-softmax", o.pre_softmax,
               "Softmax over all experts before the top-k (needed for top-1 softmax)");
  app.add_option("--moe-router-load-balancing-type", o.load_balancing,
                 "One or more of aux_loss, seq_aux_loss, global_aux_loss, sinkhorn, none")
      ->expected(1, -1)
      ->capture_default_str();
  app.add_option("--moe-aux-loss-coeff", o.aux_loss_coeff,
                 "One coefficient, or one per load-balancing type")
      ->expected(1, -1)
      ->capture_default_str();
  app.add_option("--moe-z-loss-coeff", o.z_loss_coeff, "z-loss coefficient (default: none)");
  app.add_flag("--moe-router-enable-expert-bias", o.expert_bias,
               "Aux-loss-free balancing by a per-expert bias (sigmoid score function)");
  app.add_option("--moe-router-bias-update-rate", o.bias_update_rate)->capture_default_str();
  app.add_option("--moe-input-jitter-eps", o.input_jitter_eps,
                 "Multiply the router input by noise uniform in [1-eps, 1+eps] (training)");
  app.add_flag("--calculate-per-token-loss", o.calculate_per_token_loss,
               "Sum the loss over tokens; divide the gradients by the global token count");
  app.add_option("--tokenizer-type", o.tokenizer_type, "bytes | GPTSentencePieceTokenizer")
      ->capture_default_str();
  app.add_option("--tokenizer-model", o.tokenizer_model,
                 "The SentencePiece model (with --tokenizer-type GPTSentencePieceTokenizer)");
  app.add_option("--make-vocab-size-divisible-by", o.make_vocab_size_divisible_by,
                 "Pad a SentencePiece vocabulary to a multiple of this times TP")
      ->capture_default_str();
  app.add_option("--micro-batch-size", o.micro_batch)->capture_default_str();
  app.add_option("--global-batch-size", o.global_batch)->capture_default_str();
  app.add_option("--seq-length", o.seq)->capture_default_str();
  app.add_option("--train-iters", o.train_iters)->capture_default_str();
  app.add_option("--lr", o.lr)->capture_default_str();
  app.add_option("--min-lr", o.min_lr)->capture_default_str();
  std::optional<int> warmup;
  app.add_option("--lr-warmup-iters", warmup, "Warm-up steps (default: 5% of the run)");
  app.add_option("--weight-decay", o.weight_decay)->capture_default_str();
  app.add_flag("--bf16", o.bf16,
               "BF16 parameters and activations; FP32 GEMM accumulation, loss, main gradients "
               "(reduced in FP32), main parameters and Adam moments");
  app.add_option("--moe-router-dtype", o.router_dtype,
                 "Router logits and scores in fp32 or fp64 (default: the input dtype, i.e. bf16 "
                 "logits under --bf16)");
  app.add_flag("--use-distributed-optimizer", o.use_distributed_optimizer,
               "Shard the optimizer state over dp_cp (dense) and edp (experts): reduce-scatter "
               "the gradients, update the shard, all-gather the parameters");
  app.add_option("--num-distributed-optimizer-instances", o.num_distributed_optimizer_instances,
                 "Optimizer instances: shard within partial groups, all-reduce across them")
      ->capture_default_str();
  app.add_option("--clip-grad", o.clip_grad, "Bound of the global gradient norm (0: no clipping)")
      ->capture_default_str();
  std::string seed = std::to_string(o.seed);  // converted below: CLI11 wraps "-1" to 2^64 − 1
  app.add_option("--seed", seed, "Any integer in [0, 2^64 - 1]")->capture_default_str();
  app.add_option("--eval-iters", o.eval_iters, "Validation batches per evaluation (0: none)")
      ->capture_default_str();
  app.add_option("--eval-interval", o.eval_interval, "Steps between evaluations (0: run/4)");
  app.add_option("--data-path", o.data_path,
                 "Text file or directory (default: " MOEFOLD_DEFAULT_DATA_PATH ")");
  app.add_option("--save", o.save, "Checkpoint directory to write");
  app.add_option("--save-interval", o.save_interval, "Steps between checkpoints (and the end)");
  app.add_option("--load", o.load, "Checkpoint directory to resume from (any folding)");
  app.add_option("--keep-last", o.keep_last,
                 "Keep only the newest N iterations in --save (default 0: keep all)");
  app.add_flag("--finetune", o.finetune,
               "With --load: the weights only; iteration 0, fresh optimizer moments");
  app.add_flag("--no-load-optim", o.no_load_optim,
               "With --load: the weights only (fresh optimizer moments); the run continues at "
               "the checkpoint's iteration");
  std::optional<int> ckpt_step;
  app.add_option("--ckpt-step", ckpt_step, "Iteration of --load to resume from (default: latest)");
  app.add_option("--backend", backend, "inproc | mpi | nccl")->capture_default_str();
  app.add_option("--output-dir", o.output_dir, "Loss curve (SVG, CSV) goes here")
      ->capture_default_str();
  app.add_option("--log-json", o.log_json, "JSON Lines per step (global rank 0)");
  app.add_flag("--quiet", o.quiet, "No per-step progress lines");
  bool no_nan_check = false;
  app.add_flag("--check-activations-and-grads", o.check_activations_and_grads,
               "Check every layer's output, the logits and every input gradient for NaN/Inf "
               "(moefold's own; names the layer)");
  app.add_option("--recompute-granularity", o.recompute_granularity,
                 "full: keep only each pipeline chunk's input and recompute its forward in the "
                 "backward (default: keep every in-flight microbatch's activations)")
      ->check(CLI::IsMember({"full"}));
  app.add_flag("--no-check-for-nan-in-loss-and-grad", no_nan_check,
               "Keep training when the loss or the gradient norm is NaN or infinite");
  app.add_option("--distributed-timeout-minutes", o.distributed_timeout_minutes,
                 "Minutes a rank waits in a collective before the run fails")
      ->capture_default_str();
  auto usage = [](std::string const& message) {
    fmt::print(stderr, "moefold-train: {}\n", message);
    return ParseResult{std::nullopt, 2};
  };
  try {
    app.parse(argc, argv);
  } catch (CLI::CallForHelp const&) {
    std::fputs(app.help().c_str(), stdout);
    return {std::nullopt, 0};
  } catch (CLI::ParseError const& e) {
    return usage(e.what());
  }
  // The seed: decimal digits only, in [0, 2^64 − 1] (no sign, no wrap).
  {
    auto const [end, ec] = std::from_chars(seed.data(), seed.data() + seed.size(), o.seed);
    if (seed.empty() || ec != std::errc() || end != seed.data() + seed.size())
      return usage(fmt::format("--seed must be an integer in [0, 2^64 - 1] = [0, {}] (got '{}')",
                               std::numeric_limits<std::uint64_t>::max(), seed));
  }
  if (warmup) {
    if (*warmup < 0)
      return usage(fmt::format("--lr-warmup-iters must not be negative (got {})", *warmup));
    o.warmup_iters = *warmup;
  }
  if (ckpt_step) {
    if (*ckpt_step < 0)
      return usage(fmt::format(
          "--ckpt-step must be an iteration >= 0 (got {}; without --ckpt-step, --load resumes "
          "from the latest)",
          *ckpt_step));
    if (o.load.empty())
      return usage(fmt::format("--ckpt-step {} needs --load DIR (the checkpoint to resume from)",
                               *ckpt_step));
    o.ckpt_step = *ckpt_step;
  }
  o.check_for_nan = !no_nan_check;
  for (auto const* flag : {"--data-path", "--save", "--load", "--output-dir", "--log-json"})
    if (app.count(flag) > 0 && app.get_option(flag)->as<std::string>().empty())
      return usage(fmt::format("{} needs a path (got '')", flag));
  if (backend == "inproc") {
    o.backend = Backend::inproc;
  } else if (backend == "mpi") {
    o.backend = Backend::mpi;
  } else if (backend == "nccl") {
    o.backend = Backend::nccl;
  } else {
    fmt::print(stderr, "moefold-train: --backend must be inproc, mpi or nccl (got '{}')\n",
               backend);
    return {std::nullopt, 2};
  }
  for (auto const& [flag, v] : {std::pair{"--world-size", world},
                                {"--tensor-model-parallel-size", tp},
                                {"--context-parallel-size", cp},
                                {"--pipeline-model-parallel-size", pp},
                                {"--expert-model-parallel-size", ep},
                                {"--expert-tensor-parallel-size", etp}})
    if (v && *v < 1) return usage(fmt::format("{} must be at least 1 (got {})", flag, *v));
  // The folding multiplies sizes in int: their products must fit.
  auto const size_of = [](std::optional<int> v) { return static_cast<double>(v.value_or(1)); };
  for (auto const& [what, product] :
       {std::pair{"TP·CP·PP", size_of(tp) * size_of(cp) * size_of(pp)},
        {"EP·ETP·PP", size_of(ep) * size_of(etp) * size_of(pp)}})
    if (product > std::numeric_limits<int>::max())
      return usage(fmt::format("{} = {:.0f} is more than {} ranks", what, product,
                               std::numeric_limits<int>::max()));
  if (world || tp || cp || pp || ep || etp) {
    o.tp = tp.value_or(1), o.cp = cp.value_or(1), o.pp = pp.value_or(1);
    o.ep = ep.value_or(1), o.etp = etp.value_or(1);
    o.world = world.value_or(o.tp * o.cp * o.pp);
  }
  o.world = o.backend == Backend::inproc || world ? o.world : -1;  // -1: the MPI size
  // The tokenizer: its vocabulary sizes the model.
  if (o.tokenizer_type != "bytes" && o.tokenizer_type != kSentencePiece)
    return usage(fmt::format("--tokenizer-type must be bytes or {} (got '{}')", kSentencePiece,
                             o.tokenizer_type));
  if (o.make_vocab_size_divisible_by < 1)
    return usage(fmt::format("--make-vocab-size-divisible-by must be at least 1 (got {})",
                             o.make_vocab_size_divisible_by));
  if (o.tokenizer_type == kSentencePiece) {
    if (o.tokenizer_model.empty())
      return usage(fmt::format("--tokenizer-type {} needs --tokenizer-model FILE", kSentencePiece));
    try {
      o.tokenizer_vocab = sentencepiece_vocab_size(o.tokenizer_model);
    } catch (invalid_config const& e) {
      return usage(e.what());
    }
  } else if (!o.tokenizer_model.empty()) {
    return usage(fmt::format("--tokenizer-model needs --tokenizer-type {}", kSentencePiece));
  }
  return {o, 0};
}

namespace {

template <class... A>
void need(bool ok, fmt::format_string<A...> f, A&&... a) {
  if (!ok) throw invalid_config(fmt::format(f, std::forward<A>(a)...));
}

void at_least(char const* flag, std::int64_t value, std::int64_t lo, char const* meaning = "") {
  need(value >= lo, "{} must be at least {}{} (got {})", flag, lo, meaning, value);
}

void non_negative(char const* flag, double value, char const* meaning = "") {
  need(std::isfinite(value) && value >= 0, "{} must be finite and >= 0{} (got {})", flag, meaning,
       value);
}

/// Every value on its own, before the folding and the model look at them.
void check_ranges(TrainOptions const& o) {
  at_least("--num-layers", o.num_layers, 1);
  at_least("--num-distributed-optimizer-instances", o.num_distributed_optimizer_instances, 1);
  at_least("--hidden-size", o.hidden, 1);
  at_least("--num-attention-heads", o.heads, 1);
  at_least("--num-query-groups", o.kv_groups, 1);
  at_least("--num-experts", o.num_experts, 1);
  at_least("--moe-ffn-hidden-size", o.moe_ffn, 1);
  at_least("--moe-shared-expert-intermediate-size", o.shared_expert_ffn, 0, " (0: none)");
  at_least("--num-virtual-stages-per-pipeline-rank", o.vpp, 1, " (1: plain 1F1B)");
  at_least("--micro-batch-size", o.micro_batch, 1);
  at_least("--global-batch-size", o.global_batch, 1);
  at_least("--seq-length", o.seq, 1);
  at_least("--train-iters", o.train_iters, 1);
  at_least("--eval-iters", o.eval_iters, 0, " (0: no validation)");
  at_least("--eval-interval", o.eval_interval, 0, " (0: a quarter of --train-iters)");
  at_least("--save-interval", o.save_interval, 0, " (0: at the end only)");
  at_least("--keep-last", o.keep_last, 0, " (0: keep all)");
  at_least("--distributed-timeout-minutes", o.distributed_timeout_minutes, 1);
  need(std::isfinite(o.lr) && o.lr >= 0, "--lr must be finite and >= 0 (got {})", o.lr);
  need(std::isfinite(o.rotary_base) && o.rotary_base > 1,
       "--rotary-base must be finite and > 1 (got {})", o.rotary_base);
  need(std::isfinite(o.norm_epsilon) && o.norm_epsilon > 0,
       "--norm-epsilon must be finite and > 0 (got {})", o.norm_epsilon);
  non_negative("--min-lr", o.min_lr);
  need(o.min_lr <= o.lr, "--min-lr {} must not exceed --lr {}", o.min_lr, o.lr);
  non_negative("--weight-decay", o.weight_decay);
  non_negative("--clip-grad", o.clip_grad, " (0: no clipping)");
  non_negative("--moe-router-bias-update-rate", o.bias_update_rate);
  for (double c : o.aux_loss_coeff) non_negative("--moe-aux-loss-coeff", c);
  if (o.z_loss_coeff) non_negative("--moe-z-loss-coeff", *o.z_loss_coeff);
  if (o.input_jitter_eps) non_negative("--moe-input-jitter-eps", *o.input_jitter_eps);
  // The in-process world runs one thread per rank; the tokens of a global batch are counted in
  // an int.
  if (o.backend == Backend::inproc)
    need(o.world <= kMaxInprocRanks,
         "--world-size {} is more than the in-process world's {} ranks (one thread each; use "
         "--backend mpi)",
         o.world, kMaxInprocRanks);
  need(std::int64_t{o.global_batch} * o.seq <= std::numeric_limits<int>::max(),
       "--global-batch-size·--seq-length = {}·{} = {} tokens per step is more than {}",
       o.global_batch, o.seq, std::int64_t{o.global_batch} * o.seq,
       std::numeric_limits<int>::max());
}

}  // namespace

RouterConfig router_config(TrainOptions const& o) {
  RouterConfig r;
  r.num_experts = o.num_experts;
  r.moe_router_topk = o.topk;
  if (o.score_function == "softmax")
    r.moe_router_score_function = ScoreFunction::softmax;
  else if (o.score_function == "sigmoid")
    r.moe_router_score_function = ScoreFunction::sigmoid;
  else
    throw invalid_config(fmt::format(
        "--moe-router-score-function must be softmax or sigmoid (got '{}')", o.score_function));
  r.moe_router_pre_softmax = o.pre_softmax;
  if (o.router_dtype == "fp32") r.moe_router_dtype = RouterDtype::fp32;
  if (o.router_dtype == "fp64") r.moe_router_dtype = RouterDtype::fp64;
  r.moe_router_load_balancing_type.clear();
  for (auto const& t : o.load_balancing) {
    constexpr LoadBalancingType kTypes[] = {
        LoadBalancingType::aux_loss, LoadBalancingType::seq_aux_loss,
        LoadBalancingType::global_aux_loss, LoadBalancingType::sinkhorn, LoadBalancingType::none};
    auto const* v = std::find_if(std::begin(kTypes), std::end(kTypes),
                                 [&](LoadBalancingType x) { return name(x) == t; });
    if (v == std::end(kTypes))
      throw invalid_config(fmt::format(
          "--moe-router-load-balancing-type: unknown type '{}' (aux_loss, seq_aux_loss, "
          "global_aux_loss, sinkhorn or none)",
          t));
    r.moe_router_load_balancing_type.push_back(*v);
  }
  r.moe_aux_loss_coeff = o.aux_loss_coeff;
  r.moe_z_loss_coeff = o.z_loss_coeff;
  r.moe_router_enable_expert_bias = o.expert_bias;
  r.moe_router_bias_update_rate = o.bias_update_rate;
  r.moe_input_jitter_eps = o.input_jitter_eps;
  r.calculate_per_token_loss = o.calculate_per_token_loss;
  return r;
}

void validate(TrainOptions const& o) {
  auto need = [](bool ok, std::string const& msg) {
    if (!ok) throw invalid_config(msg);
  };
  if (o.backend == Backend::nccl)
    throw invalid_config(
        MOEFOLD_HAS_NCCL ? "--backend nccl: this demo's layers run on the CPU; use inproc or mpi"
                         : "--backend nccl: this build has no NCCL (configure with CUDA and "
                           "NCCL); use inproc or mpi");
  if (o.backend == Backend::mpi && !MOEFOLD_HAS_MPI)
    throw invalid_config("--backend mpi: this build has no MPI (install libopenmpi-dev)");
  check_ranges(o);
  need(o.router_dtype.empty() || o.router_dtype == "fp32" || o.router_dtype == "fp64",
       fmt::format("--moe-router-dtype must be fp32 or fp64 (got '{}')", o.router_dtype));
  need(o.num_distributed_optimizer_instances == 1 || o.use_distributed_optimizer,
       fmt::format("--num-distributed-optimizer-instances {} needs --use-distributed-optimizer",
                   o.num_distributed_optimizer_instances));
  auto const fold = FoldedMapping::from(o.folding());
  check_memory(o);
  need(o.hidden % o.heads == 0 && (o.hidden / o.heads) % 2 == 0,
       fmt::format("--hidden-size {} must be an even multiple of --num-attention-heads {} (the "
                   "rotary head dimension is even)",
                   o.hidden, o.heads));
  need(o.heads % o.kv_groups == 0,
       fmt::format("--num-attention-heads {} is not divisible by --num-query-groups {}", o.heads,
                   o.kv_groups));
  need(
      o.heads % o.tp == 0 && o.kv_groups % o.tp == 0,
      fmt::format("--num-attention-heads {} and --num-query-groups {} must be divisible by TP = {}",
                  o.heads, o.kv_groups, o.tp));
  need(o.seq % (2 * o.cp * o.tp) == 0,
       fmt::format("--seq-length {} is not divisible by 2·CP·TP = 2·{}·{} = {}", o.seq, o.cp, o.tp,
                   2 * o.cp * o.tp));
  need(o.padded_vocab() % o.tp == 0,
       fmt::format("the byte vocabulary (256) is not divisible by TP = {}", o.tp));
  need(o.num_layers % (o.pp * o.vpp) == 0,
       fmt::format("--num-layers {} is not divisible by PP·VPP = {}·{} = {}", o.num_layers, o.pp,
                   o.vpp, o.pp * o.vpp));
  std::int64_t const dp = fold.dp();
  need(o.global_batch % (o.micro_batch * dp) == 0,
       fmt::format("--global-batch-size {} is not divisible by micro-batch-size·DP = {}·{} = {}",
                   o.global_batch, o.micro_batch, dp, o.micro_batch * dp));
  std::int64_t const m = o.global_batch / (o.micro_batch * dp);
  if (o.vpp > 1)
    need(m % o.pp == 0,
         fmt::format("interleaved 1F1B needs the number of microbatches M = {} to be a multiple "
                     "of PP = {}",
                     m, o.pp));
  need(o.num_experts >= 1 && o.num_experts % o.ep == 0,
       fmt::format("--num-experts {} is not divisible by EP = {}", o.num_experts, o.ep));
  need(o.topk >= 1 && o.topk <= o.num_experts,
       fmt::format("--moe-router-topk {} must be in [1, --num-experts {}]", o.topk, o.num_experts));
  need(o.moe_ffn % o.etp == 0 && o.moe_ffn % o.tp == 0,
       fmt::format("--moe-ffn-hidden-size {} must be divisible by ETP = {} and TP = {}", o.moe_ffn,
                   o.etp, o.tp));
  need(o.shared_expert_ffn >= 0 && o.shared_expert_ffn % o.tp == 0,
       fmt::format("--moe-shared-expert-intermediate-size {} must be divisible by TP = {}",
                   o.shared_expert_ffn, o.tp));
  need(!o.shared_expert_overlap || o.shared_expert_ffn > 0,
       "--moe-shared-expert-overlap needs a shared expert (--moe-shared-expert-intermediate-size "
       "> 0)");
  router_config(o).validate();  // Megatron's router rules, with the flags' names
  need(o.save_interval == 0 || !o.save.empty(), "--save-interval needs --save DIR");
  need((!o.finetune && !o.no_load_optim) || !o.load.empty(),
       fmt::format("{} needs --load DIR (the checkpoint whose weights to load)",
                   o.finetune ? "--finetune" : "--no-load-optim"));
  need(o.ckpt_step < 0 || !o.load.empty(),
       fmt::format("--ckpt-step {} needs --load DIR", o.ckpt_step));
}

std::string data_path_of(TrainOptions const& o) {
  return o.data_path.empty() ? std::string(MOEFOLD_DEFAULT_DATA_PATH) : o.data_path;
}

}  // namespace moefold::train_demo
