#pragma once
// The command line of moefold-train: Megatron's flag names, the defaults of the demo, and the
// checks that turn an invalid value or combination into one line on stderr and exit status 2
// before any work (every numeric flag is range-checked; integers never wrap; the memory a
// request needs is estimated up front; the files named on the command line are checked).

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "moefold/moe/router_config.hpp"

#include "moefold/mesh/folded_mapping.hpp"

namespace moefold::train_demo {

enum class Backend { inproc, mpi, nccl };

/// The most ranks an in-process world runs (one thread each).
inline constexpr int kMaxInprocRanks = 1024;

struct TrainOptions {
  Backend backend = Backend::inproc;
  // Folding. With no size flag: 8 ranks, attention TP2·CP2·PP2 (DP1), MoE EP4·ETP1 (EDP1).
  // Once any size flag is given, the unspecified sizes are 1 and the world is TP·CP·PP (DP 1)
  // unless --world-size says otherwise.
  int world = 8, tp = 2, cp = 2, pp = 2, vpp = 1, ep = 4, etp = 1;
  // Model (Mixtral-style: RMSNorm, GQA + RoPE, SwiGLU experts, top-k routing).
  int num_layers = 4;
  int hidden = 128;
  int heads = 8;
  int kv_groups = 4;
  int num_experts = 8;
  int topk = 2;
  int moe_ffn = 256;
  int shared_expert_ffn = 0;  ///< --moe-shared-expert-intermediate-size (0: none)
  bool shared_expert_overlap = false;  ///< --moe-shared-expert-overlap
  double rotary_base = 10000.0;  ///< --rotary-base (RoPE's base; Mixtral uses 1e6)
  double norm_epsilon = 1e-5;    ///< --norm-epsilon (RMSNorm's epsilon)
  bool add_qkv_bias = false;     ///< --add-qkv-bias (a bias on the attention's QKV projection)
  // Router (Megatron's flags; see router_config()).
  std::string score_function = "softmax";                  ///< --moe-router-score-function
  bool pre_softmax = false;                                ///< --moe-router-pre-softmax
  std::vector<std::string> load_balancing = {"aux_loss"};  ///< --moe-router-load-balancing-type
  std::vector<double> aux_loss_coeff = {1e-2};             ///< --moe-aux-loss-coeff
  std::optional<double> z_loss_coeff;                      ///< --moe-z-loss-coeff
  bool expert_bias = false;                                ///< --moe-router-enable-expert-bias
  double bias_update_rate = 1e-3;                          ///< --moe-router-bias-update-rate
  std::optional<double> input_jitter_eps;                  ///< --moe-input-jitter-eps
  bool calculate_per_token_loss = false;                   ///< --calculate-per-token-loss
  // Precision (Megatron's flags).
  bool bf16 = false;  ///< --bf16: bf16 parameters and activations, FP32 main grads and params
  /// --moe-router-dtype: fp32 or fp64; empty: the input dtype (Megatron's default: FP32 logits
  /// in an FP32 run, bf16 logits under --bf16).
  std::string router_dtype;
  // Optimizer sharding (Megatron's flags).
  bool use_distributed_optimizer = false;        ///< --use-distributed-optimizer
  int num_distributed_optimizer_instances = 1;   ///< --num-distributed-optimizer-instances
  // Tokens (Megatron's flags): bytes by default, or a SentencePiece model.
  std::string tokenizer_type = "bytes";    ///< --tokenizer-type: bytes | GPTSentencePieceTokenizer
  std::string tokenizer_model;             ///< --tokenizer-model: the SentencePiece model file
  int make_vocab_size_divisible_by = 128;  ///< --make-vocab-size-divisible-by (SentencePiece)
  int tokenizer_vocab = 256;  ///< the tokenizer's vocabulary (set when the options are parsed)
  // Data and schedule.
  int micro_batch = 2;
  int global_batch = 16;
  int seq = 64;
  int train_iters = 200;
  double lr = 3e-3;
  double min_lr = 3e-4;
  int warmup_iters = -1;  ///< −1: 5% of train_iters
  double weight_decay = 0.1;
  double clip_grad = 1.0;     ///< --clip-grad: the global gradient norm's bound (0: no clipping)
  std::uint64_t seed = 1234;  ///< --seed, any integer in [0, 2^64 − 1]
  int eval_iters = 4;         ///< 0: no validation
  int eval_interval = 0;      ///< 0: a quarter of train_iters
  /// Megatron's check: a NaN or infinite loss or gradient norm stops training (turned off by
  /// --no-check-for-nan-in-loss-and-grad).
  bool check_for_nan = true;
  /// moefold's own opt-in per-layer check (--check-activations-and-grads): names the layer.
  bool check_activations_and_grads = false;
  /// --recompute-granularity: "" keeps every in-flight microbatch's activations (Megatron's
  /// default); "full" re-runs each chunk's forward in its backward.
  std::string recompute_granularity;
  /// --distributed-timeout-minutes: how long a rank waits in a collective before the run fails
  /// (Megatron's default, 10), in-process and under MPI.
  int distributed_timeout_minutes = 10;
  // Files.
  std::string data_path;
  std::string save, load;
  int save_interval = 0;
  int ckpt_step = -1;  ///< --ckpt-step: the iteration to load (−1: the latest)
  /// --finetune: load the weights only and start at iteration 0 with fresh optimizer moments.
  bool finetune = false;
  /// --no-load-optim: load the weights only (fresh moments); the run continues at the
  /// checkpoint's iteration.
  bool no_load_optim = false;
  int keep_last = 0;   ///< --keep-last: keep the newest N iterations of --save (0: all)
  std::string output_dir = "./moefold-train-out";
  std::string log_json;
  bool quiet = false;  ///< no progress lines (tests)

  int dp() const noexcept { return world / (tp * cp * pp); }
  /// The model's vocabulary: 256 bytes, or the SentencePiece vocabulary rounded up to a
  /// multiple of --make-vocab-size-divisible-by · TP (Megatron's padding).
  std::int64_t padded_vocab() const noexcept {
    if (tokenizer_type == "bytes") return 256;
    std::int64_t const m = std::int64_t{make_vocab_size_divisible_by} * tp;
    return (tokenizer_vocab + m - 1) / m * m;
  }
  int microbatches() const noexcept { return global_batch / (micro_batch * dp()); }
  int warmup() const noexcept { return warmup_iters >= 0 ? warmup_iters : train_iters / 20; }
  FoldingConfig folding() const;
};

/// The result of parsing: options to run, or an exit status (help printed: 0; error: 2).
struct ParseResult {
  std::optional<TrainOptions> options;
  int exit_status = 0;
};

/// Parses argv. On an error prints one line to stderr and returns exit status 2.
ParseResult parse_options(int argc, char** argv);

/// Checks every value's range, the options against the folding (with `world` ranks), the
/// model's divisibility rules and the memory the run would need; throws `invalid_config` naming
/// the broken rule and the numbers.
void validate(TrainOptions const& o);

/// The router's configuration from the command line (throws `invalid_config` for an unknown
/// score function or load-balancing type).
RouterConfig router_config(TrainOptions const& o);

/// The data directory: --data-path, else the compiled-in default.
std::string data_path_of(TrainOptions const& o);

}  // namespace moefold::train_demo
