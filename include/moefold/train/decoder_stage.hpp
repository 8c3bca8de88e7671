#pragma once
/// \file
/// `DecoderStage`: the part of a decoder-only language model that one pipeline rank holds, as a
/// `PipelineStageModel` for `run_pipeline` — Megatron's GPT layout with untied input embedding
/// and output layer (`--untie-embeddings-and-output-weights`):
///
///   virtual stage 0:      VocabParallelEmbedding (ids → SP-local [S/(CP·TP)·B, H])
///   every virtual stage:  its L/(PP·N) DecoderLayers (attention + the MLP slot)
///   last virtual stage:   final RMSNorm → output layer (column-parallel, [V, H]) →
///                         VocabParallelCrossEntropy
///
/// Chunk c of PP rank p is virtual stage v = c·PP + p and holds layers [v·L/(PP·N), …) (Megatron's
/// interleaved layout); parameters carry the global layer number ("decoder.layers.<i>…"), so every
/// folding holds slices of the same global tensors.
///
/// Activations (Megatron's `recompute_granularity`): a pipeline schedule has several microbatches
/// in flight. By default (`none`, as Megatron) every layer keeps each in-flight microbatch's
/// saved tensors: after a chunk's forward the stage stashes them under the microbatch
/// (nn/microbatch_stash.hpp) and restores them before its backward, so each microbatch runs
/// one forward. With `full` the stage keeps only each microbatch's chunk input and, in
/// `backward`, re-runs the chunk's forward before its backward — unless the chunk's last forward
/// was that very microbatch (1F1B's last stage) — trading compute for activation memory. `none`
/// needs every layer to be a `StashingLayer` (the library's are; a custom MLP slot may not be).
/// All ranks of a pipeline stage run the same actions in the same order, so the collectives
/// inside the layers (tp, cp, and the MLP slot's groups) stay matched.
///
/// Loss (Megatron's convention, spec §3.3): on the last virtual stage the microbatch loss is the
/// mean over this rank's CP-local tokens divided by the number of microbatches M; with
/// `reduce_gradients` (× 1/(DP·CP), SUM over dp_cp) the gradients are those of the mean over
/// every token of the global batch. With `calculate_per_token_loss` it is the sum over the
/// tokens, and the step finalizer divides every gradient by the global token count.
///
/// The MLP slots see each forward's `ForwardContext`: scheduled forwards are `train` (or `eval`
/// in a forward-only step) and the recomputation in `backward` is `recompute`, so per-step
/// statistics are counted once per microbatch; the auxiliary losses' gradient weight is
/// Megatron's CP/M (1 in per-token mode), set here for every microbatch. After the
/// microbatches, `finalize_model_grads` (finalize_model_grads.hpp) ends the step.
///
/// The stage runs on an execution instance `Exec` (`exec()`): its own tensor work (copies of
/// activations, the loss gradient, the loss sum, the finiteness checks) goes through it and the
/// ops tier; `cpu::DecoderStage<T, Comm, Mlp>` is the host one.

#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/process_groups.hpp"
#include "moefold/core/buffer.hpp"
#include "moefold/core/error.hpp"
#include "moefold/core/precision.hpp"
#include "moefold/core/view.hpp"
#include "moefold/exec/cpu.hpp"
#include "moefold/exec/instance.hpp"
#include "moefold/nn/column_parallel_linear.hpp"
#include "moefold/nn/decoder_layer.hpp"
#include "moefold/nn/forward_context.hpp"
#include "moefold/nn/rms_norm.hpp"
#include "moefold/nn/vocab_parallel_cross_entropy.hpp"
#include "moefold/nn/vocab_parallel_embedding.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/gradients.hpp"

namespace moefold {
inline namespace v0 {

/// What a pipeline stage keeps of each in-flight microbatch (Megatron's
/// `--recompute-granularity`; `selective` is not offered).
enum class RecomputeGranularity : std::uint8_t {
  none,  ///< every layer keeps the microbatch's saved tensors (the default, as Megatron)
  full,  ///< keep each chunk's input only and re-run its forward before the backward
};

/// Sizes of a decoder-only model (Megatron's names in comments). The MLP slot has its own
/// config.
struct DecoderModelConfig {
  std::int64_t vocab = 256;      ///< padded_vocab_size V
  std::int64_t hidden = 0;       ///< hidden_size H
  std::int64_t num_layers = 0;   ///< num_layers L
  std::int64_t heads = 0;        ///< num_attention_heads
  std::int64_t kv_groups = 0;    ///< num_query_groups (0: equal to heads)
  std::int64_t seq = 0;          ///< seq_length S
  std::int64_t micro_batch = 1;  ///< micro_batch_size B (sequences per DP replica)
  double norm_eps = 1e-5;        ///< norm_epsilon
  double rope_base = 10000.0;    ///< rotary_base
  bool add_qkv_bias = false;     ///< add_qkv_bias: a bias on every attention's QKV projection
  std::uint64_t seed = 0;        ///< seed of every parameter's initial value
  double init_scale = 0.02;      ///< init_method_std
  /// `calculate_per_token_loss`: the loss is the sum over tokens; gradients are divided by the
  /// global token count in `finalize_model_grads` (spec §4.1). The MLP slot's router must be
  /// configured alike.
  bool calculate_per_token_loss = false;
  /// moefold's own opt-in check (`--check-activations-and-grads`): every layer's output, the
  /// logits and every layer's input gradient must be finite; the first that is not throws,
  /// naming the layer, the microbatch and the rank.
  bool check_activations_and_grads = false;
  /// `recompute_granularity`: `none` keeps every in-flight microbatch's activations, `full`
  /// recomputes each chunk's forward in its backward (see `DecoderStage`).
  RecomputeGranularity recompute_granularity = RecomputeGranularity::none;
};

/// This rank's token ids and labels of one microbatch: its CP-local tokens [S/CP · B]
/// (`SequenceShard::extract_cp`), the same on every TP rank of a CP rank.
struct MicrobatchTokens {
  std::vector<std::int64_t> ids;
  std::vector<std::int64_t> labels;
  /// The global index of each token (stream sequence · S + position), or empty: keys the
  /// router's input jitter, so its noise is the same under every folding.
  std::vector<std::int64_t> index = {};
};

/// The chunks of one PP rank of a decoder-only model, with full activation recomputation.
template <ExecutionInstance Exec, class T, Communicator Comm, class Mlp = DenseMlp<Exec, T, Comm>>
class DecoderStage {
 public:
  using value_type = T;
  /// The losses' type: FP32 for a bf16 model (the cross-entropy runs in FP32).
  using loss_type = compute_t<T>;
  using memory_space = typename Exec::memory_space;
  // The nn types the stage is made of (the one place that spells them).
  using Layer = DecoderLayer<Exec, T, Comm, Mlp>;
  using Embedding = VocabParallelEmbedding<Exec, T, Comm>;
  using FinalNorm = RmsNorm<Exec, T>;
  using OutputLayer = ColumnParallelLinear<Exec, T, Comm>;
  using CrossEntropy = VocabParallelCrossEntropy<Exec, T, Comm>;
  /// What the nn layers' forward and backward return.
  using Tensor = Buffer<T, memory_space>;
  using MlpConfig = typename Mlp::Config;
  /// The tokens of microbatch `mb` of the current step on this rank.
  using TokenSource = std::function<MicrobatchTokens(int mb)>;

  /// Builds the layers of this PP rank's `chunks` chunks. Throws `invalid_config` when L is not
  /// divisible by PP·chunks, or a layer cannot be split by the folding.
  DecoderStage(Exec exec, DecoderModelConfig cfg, MlpConfig mlp, ProcessGroups<Comm>& groups,
               int chunks = 1)
      : exec_(std::move(exec)),
        cfg_(cfg),
        groups_(&groups),
        pp_(groups.pp().size()),
        pp_rank_(groups.pp().rank()) {
    int const stages = pp_ * chunks;
    MOEFOLD_EXPECTS(chunks >= 1, "DecoderStage: chunks must be at least 1 (got {})", chunks);
    if (!recomputes() && !kLayersStash)
      throw invalid_config(
          "recompute_granularity none keeps every in-flight microbatch's activations, which "
          "needs an MLP slot that can stash them (a StashingLayer: stash, restore, "
          "drop_stashed); this MLP slot cannot: use recompute_granularity full");
    if (cfg_.num_layers < 1 || cfg_.num_layers % stages != 0)
      throw invalid_config(fmt::format(
          "num_layers = {} is not divisible by PP·VPP = {}·{} = {} (every virtual pipeline "
          "stage holds the same number of layers)",
          cfg_.num_layers, pp_, chunks, stages));
    std::int64_t const per = cfg_.num_layers / stages;
    chunks_.resize(static_cast<std::size_t>(chunks));
    for (int c = 0; c < chunks; ++c) {
      std::int64_t const first = (std::int64_t{c} * pp_ + pp_rank_) * per;
      chunks_[static_cast<std::size_t>(c)].first_layer = first;
      for (std::int64_t i = first; i < first + per; ++i)
        chunks_[static_cast<std::size_t>(c)].layers.push_back(
            std::make_unique<Layer>(exec_, layer_config(i, mlp), groups));
    }
    if (is_first(0))
      embedding_ = std::make_unique<Embedding>(
          exec_,
          EmbeddingConfig{.name = "embedding.word_embeddings.weight",
                          .vocab = cfg_.vocab,
                          .hidden = cfg_.hidden,
                          .seed = cfg_.seed,
                          .init_scale = cfg_.init_scale},
          groups.tp());
    if (is_last(chunks - 1)) {
      final_norm_ = std::make_unique<FinalNorm>(exec_, RMSNormConfig{
          .name = "decoder.final_layernorm.weight", .hidden = cfg_.hidden, .eps = cfg_.norm_eps});
      output_ = std::make_unique<OutputLayer>(
          exec_,
          LinearConfig{.name = "output_layer.weight",
                       .in = cfg_.hidden,
                       .out = cfg_.vocab,
                       .seed = cfg_.seed,
                       .scale = cfg_.init_scale},
          groups.tp());
      cross_entropy_ = std::make_unique<CrossEntropy>(exec_, cfg_.vocab, groups.tp());
    }
    tokens_per_rank_ = cfg_.seq / (groups.cp().size() * groups.tp().size()) * cfg_.micro_batch;
  }
  DecoderStage(DecoderModelConfig cfg, MlpConfig mlp, ProcessGroups<Comm>& groups, int chunks = 1)
    requires std::default_initializable<Exec>
      : DecoderStage(Exec{}, cfg, std::move(mlp), groups, chunks) {}

  /// The execution instance the stage runs on.
  Exec const& exec() const noexcept { return exec_; }

  /// Starts a step of `microbatches` microbatches whose tokens come from `source`. With
  /// `training` false the step is forward-only: its forwards are evaluations (no auxiliary loss,
  /// no statistics) and `backward` does nothing. `step` is the training iteration (a key of the
  /// router's input jitter).
  void begin_step(int microbatches, TokenSource source, bool training, std::int64_t step = 0) {
    MOEFOLD_EXPECTS(microbatches >= 1, "DecoderStage: a step needs at least one microbatch");
    microbatches_ = microbatches;
    source_ = std::move(source);
    training_ = training;
    step_ = step;
    aux_loss_ = 0;
    tokens_.clear();
    for (auto& [key, saved] : stash_) spare_.push_back(std::move(saved));
    stash_.clear();
    for (auto& c : chunks_) c.fresh = -1;
    for (int c = 0; c < num_chunks(); ++c) for_each_stashing(c, [](auto& l) { l.drop_stashed(); });
  }

  /// Calls `f(mb, chunk)` after every scheduled forward of a chunk (not after the recomputation
  /// in `backward`), e.g. to collect the MoE layers' auxiliary losses once per microbatch.
  void after_forward(std::function<void(int mb, int chunk)> f) { after_forward_ = std::move(f); }

  /// Elements of an activation between virtual stages: [S/(CP·TP)·B, H].
  std::size_t activation_size() const noexcept {
    return static_cast<std::size_t>(tokens_per_rank_ * cfg_.hidden);
  }

  /// Forward of microbatch `mb` through chunk `chunk` (see `PipelineStageModel`). On the last
  /// virtual stage `out[0]` receives the microbatch's scaled loss (mean over this rank's tokens,
  /// divided by M), in `loss_type` (the executor passes a span of it there).
  template <class U>
    requires(std::same_as<U, T> || std::same_as<U, loss_type>)
  void forward(int mb, int chunk, std::span<T const> in, std::span<U> out) {
    if (!is_first(chunk) && training_ && recomputes()) {
      auto& saved = stash_[{mb, chunk}];
      saved = take_activation(static_cast<std::int64_t>(in.size()));
      copy(exec_, View<T const, memory_space>(in), saved.view());
    }
    auto y = run_chunk(mb, chunk, in, training_ ? ForwardMode::train : ForwardMode::eval);
    for_each_mlp(chunk, [&](auto& mlp) {
      if constexpr (requires { mlp.aux_loss(); }) aux_loss_ += mlp.aux_loss();
    });
    if (after_forward_) after_forward_(mb, chunk);
    if (is_last(chunk)) {
      MOEFOLD_EXPECTS(!out.empty(), "DecoderStage: the last virtual stage's output holds no loss");
      out[0] = narrow<U>(last_loss_);  // host memory of the pipeline schedule
    } else if constexpr (std::same_as<U, T>) {
      copy(exec_, View<T const, memory_space>(y), View<T, memory_space>(out));
    } else {
      throw error(errc::invalid_argument, "DecoderStage: a loss span for a stage that is not last");
    }
    if (training_ && !recomputes()) for_each_stashing(chunk, [mb](auto& l) { l.stash(mb); });
  }

  /// Backward of microbatch `mb` through chunk `chunk`: restores the microbatch's stashed
  /// activations (or, with `recompute_granularity` full, recomputes the chunk's forward when its
  /// layers hold another microbatch's state), then back-propagates and accumulates gradients.
  void backward(int mb, int chunk, std::span<T const> out_grad, std::span<T> in_grad) {
    if (!training_) return;  // evaluation: in_grad stays zero
    auto& ch = chunks_[static_cast<std::size_t>(chunk)];
    Buffer<T, memory_space> input;
    if (!recomputes()) {
      for_each_stashing(chunk, [mb](auto& l) { l.restore(mb); });
    } else if (!is_first(chunk)) {
      auto it = stash_.find({mb, chunk});
      MOEFOLD_EXPECTS(it != stash_.end(),
                      "DecoderStage: no stashed input of microbatch {} chunk {}", mb, chunk);
      input = std::move(it->second);
      stash_.erase(it);
    }
    if (recomputes() && ch.fresh != mb)
      run_chunk(mb, chunk, std::span<T const>(input.view()), ForwardMode::recompute);
    ch.fresh = -1;

    Tensor dy;
    View<T const, memory_space> grad(out_grad);  // the gradient flowing down the chunk
    if (is_last(chunk)) {
      // out_grad holds the scalar loss's gradient (host memory of the pipeline schedule).
      loss_type const g = widen(out_grad[0]);
      loss_type const scale = cfg_.calculate_per_token_loss
                                  ? g
                                  : g / static_cast<loss_type>(loss_tokens() * microbatches_);
      if (static_cast<std::int64_t>(dloss_.size()) != loss_tokens())
        dloss_ = exec_.template allocate<loss_type>(loss_tokens());
      ops::fill(exec_, dloss_.view(), scale);
      auto const dlogits = cross_entropy_->backward(std::span<loss_type const>(dloss_.view()));
      auto const dz = output_->backward(std::span<T const>(dlogits));
      dy = final_norm_->backward(std::span<T const>(dz));
      grad = View<T const, memory_space>(dy);
    }
    for (std::size_t j = ch.layers.size(); j-- > 0;) {
      dy = ch.layers[j]->backward(std::span<T const>(grad));
      grad = View<T const, memory_space>(dy);
      check_finite(grad, "input gradient", ch.first_layer + static_cast<std::int64_t>(j), mb);
    }
    if (is_first(chunk))
      embedding_->backward(std::span<T const>(grad));
    else
      copy(exec_, grad, View<T, memory_space>(in_grad));
    if (!input.empty()) spare_.push_back(std::move(input));
  }

  /// Every parameter this rank holds, in a fixed order (embedding, layers by chunk, head).
  ParamList<T> parameters() {
    ParamList<T> out;
    if (embedding_) append(out, embedding_->parameters());
    for (auto& c : chunks_)
      for (auto& l : c.layers) append(out, l->parameters());
    if (final_norm_) {
      append(out, final_norm_->parameters());
      append(out, output_->parameters());
    }
    return out;
  }

  /// Σ of the MLP slots' auxiliary losses over this step's scheduled forwards (recomputations
  /// not counted again): this rank's share; a replica's is the sum over tp_cp and pp.
  double aux_loss() const noexcept { return aux_loss_; }
  /// The tokens whose losses this rank summed in this step (last stage: M · S/CP · B; other
  /// stages 0): the per-token-loss divisor before its reduction over pp and dp_cp.
  std::int64_t loss_tokens_in_step() const noexcept {
    return holds_loss() ? loss_tokens() * microbatches_ : 0;
  }
  DecoderModelConfig const& config() const noexcept { return cfg_; }

  /// Calls `f(mlp)` for the MLP slot of every decoder layer of this rank (e.g. the step
  /// finalizer's expert-bias update).
  template <class F>
  void for_each_mlp(F&& f) {
    for (int c = 0; c < num_chunks(); ++c) for_each_mlp(c, f);
  }

  /// The decoder layers of chunk `chunk` (e.g. to read an MoE layer's auxiliary loss).
  std::vector<std::unique_ptr<Layer>>& layers(int chunk) {
    return chunks_.at(static_cast<std::size_t>(chunk)).layers;
  }
  int num_chunks() const noexcept { return static_cast<int>(chunks_.size()); }
  /// True when chunk `chunk` of this rank is the first (last) virtual stage of the model.
  bool is_first(int chunk) const noexcept { return pp_rank_ == 0 && chunk == 0; }
  bool is_last(int chunk) const noexcept {
    return pp_rank_ == pp_ - 1 && chunk == static_cast<int>(chunks_.size()) - 1;
  }
  bool holds_loss() const noexcept { return is_last(num_chunks() - 1); }

 private:
  struct Chunk {
    std::vector<std::unique_ptr<Layer>> layers;
    std::int64_t first_layer = 0;  ///< global index of layers[0]
    int fresh = -1;  ///< the microbatch whose forward state the layers hold, or −1
  };

  /// With `check_activations_and_grads`: throws at the first non-finite value of `v`, naming
  /// the layer (−1: the output layer's logits), the microbatch and the rank.
  void check_finite(View<T const, memory_space> v, char const* what, std::int64_t layer,
                    int mb) {
    if (!cfg_.check_activations_and_grads) return;
    ops::first_non_finite(exec_, v, first_bad_.view());
    Buffer<std::int64_t> at(1);
    copy(exec_, View<std::int64_t const, memory_space>(first_bad_.view()), at.view());
    exec_.fence();
    std::int64_t const i = at[0];
    if (i < 0) return;
    Buffer<T> value(1);
    copy(exec_, v.cols(i, 1), value.view());
    exec_.fence();
    throw error(errc::invalid_argument,
                fmt::format("non-finite {} ({}) at element {} of {}, microbatch {}, on world "
                            "rank {}",
                            what, static_cast<double>(widen(value[0])), i,
                            layer < 0 ? std::string("output_layer")
                                      : fmt::format("decoder.layers.{}", layer),
                            mb, groups_->world().rank()));
  }

  /// A buffer for one stashed activation of n elements, from the spares when one fits.
  Buffer<T, memory_space> take_activation(std::int64_t n) {
    while (!spare_.empty()) {
      auto b = std::move(spare_.back());
      spare_.pop_back();
      if (static_cast<std::int64_t>(b.size()) == n) return b;
    }
    return exec_.template allocate<T>(n);
  }

  /// Whether every decoder layer can keep several microbatches' activations.
  static constexpr bool kLayersStash = StashingLayer<Layer>;
  bool recomputes() const noexcept {
    return cfg_.recompute_granularity == RecomputeGranularity::full;
  }
  /// Calls `f(layer)` for every layer of chunk `chunk` that keeps saved tensors: its decoder
  /// layers, and the embedding or the head where the chunk holds them (no-op when the decoder
  /// layers cannot stash: then the stage recomputes).
  template <class F>
  void for_each_stashing(int chunk, F&& f) {
    if constexpr (kLayersStash) {
      for (auto& l : chunks_[static_cast<std::size_t>(chunk)].layers) f(*l);
      if (is_first(chunk)) f(*embedding_);
      if (is_last(chunk)) {
        f(*final_norm_);
        f(*output_);
        f(*cross_entropy_);
      }
    }
  }

  template <class F>
  void for_each_mlp(int chunk, F&& f) {
    for (auto& l : chunks_[static_cast<std::size_t>(chunk)].layers) f(l->mlp());
  }

  typename Layer::Config layer_config(std::int64_t index, MlpConfig mlp) const {
    typename Layer::Config c;
    c.name = fmt::format("decoder.layers.{}", index);
    c.attention = AttentionConfig{.hidden = cfg_.hidden,
                                  .heads = cfg_.heads,
                                  .kv_groups = cfg_.kv_groups,
                                  .rope_base = cfg_.rope_base,
                                  .add_qkv_bias = cfg_.add_qkv_bias,
                                  .seed = cfg_.seed,
                                  .init_scale = cfg_.init_scale};
    c.mlp = std::move(mlp);
    c.norm_eps = cfg_.norm_eps;
    return c;
  }

  std::int64_t loss_tokens() const noexcept {
    return cfg_.seq / groups_->cp().size() * cfg_.micro_batch;  // CP-local tokens
  }

  MicrobatchTokens const& tokens(int mb) {
    auto it = tokens_.find(mb);
    if (it == tokens_.end()) it = tokens_.emplace(mb, source_(mb)).first;
    return it->second;
  }

  /// The chunk's forward from `in` (ignored on the first virtual stage); on the last virtual
  /// stage keeps the scaled loss in `last_loss_` and returns nothing.
  Tensor run_chunk(int mb, int chunk, std::span<T const> in, ForwardMode mode) {
    auto& ch = chunks_[static_cast<std::size_t>(chunk)];
    Tensor x;
    View<T const, memory_space> cur(in);  // the activation flowing up the chunk
    if (is_first(chunk)) {
      x = embedding_->forward(std::span<std::int64_t const>(tokens(mb).ids));
      cur = View<T const, memory_space>(x);
    }
    // The SP-local rows of the CP-local [S/CP, B] tokens: rows [tp·S/(CP·TP), …) (sequence_shard).
    std::span<std::int64_t const> index;
    if (auto const& all = tokens(mb).index; !all.empty()) {
      MOEFOLD_EXPECTS(all.size() == static_cast<std::size_t>(loss_tokens()),
                      "DecoderStage: microbatch {} has {} token indices, expected S/CP·B = {}", mb,
                      all.size(), loss_tokens());
      index = std::span<std::int64_t const>(all).subspan(
          static_cast<std::size_t>(groups_->tp().rank() * tokens_per_rank_),
          static_cast<std::size_t>(tokens_per_rank_));
    }
    ForwardContext const ctx{
        .mode = mode,
        .batch = cfg_.micro_batch,
        .microbatch = mb,
        .step = step_,
        .aux_loss_scale = aux_loss_gradient_scale(groups_->cp().size(), microbatches_,
                                                  cfg_.calculate_per_token_loss),
        .token_index = index};
    for (std::size_t j = 0; j < ch.layers.size(); ++j) {
      x = ch.layers[j]->forward(std::span<T const>(cur), ctx);
      cur = View<T const, memory_space>(x);
      check_finite(cur, "output", ch.first_layer + static_cast<std::int64_t>(j), mb);
    }
    ch.fresh = mb;
    if (!is_last(chunk)) return x;
    auto const z = final_norm_->forward(std::span<T const>(cur));
    auto const logits = output_->forward(std::span<T const>(z));
    check_finite(View<T const, memory_space>(logits), "logits", -1, mb);
    auto const losses = cross_entropy_->forward(std::span<T const>(logits),
                                                std::span<std::int64_t const>(tokens(mb).labels));
    ops::sum_in_double(exec_, View<loss_type const, memory_space>(losses), loss_sum_.view());
    Buffer<double> host_sum(1);
    copy(exec_, View<double const, memory_space>(loss_sum_.view()), host_sum.view());
    exec_.fence();
    double const sum = host_sum[0];
    last_loss_ = cfg_.calculate_per_token_loss
                     ? static_cast<loss_type>(sum)
                     : static_cast<loss_type>(sum / static_cast<double>(loss_tokens()) / microbatches_);
    return {};
  }

  Exec exec_;
  DecoderModelConfig cfg_;
  ProcessGroups<Comm>* groups_;
  int pp_ = 1, pp_rank_ = 0;
  std::int64_t tokens_per_rank_ = 0;
  std::vector<Chunk> chunks_;
  std::unique_ptr<Embedding> embedding_;
  std::unique_ptr<FinalNorm> final_norm_;
  std::unique_ptr<OutputLayer> output_;
  std::unique_ptr<CrossEntropy> cross_entropy_;

  // Reused across microbatches and steps.
  Buffer<loss_type, memory_space> dloss_;                            ///< the losses' gradient
  loss_type last_loss_ = 0;  ///< the last stage's scaled loss of the last forward
  Buffer<double, memory_space> loss_sum_ = exec_.template allocate<double>(1);
  Buffer<std::int64_t, memory_space> first_bad_ = exec_.template allocate<std::int64_t>(1);
  std::vector<Buffer<T, memory_space>> spare_;  ///< stash buffers to reuse

  int microbatches_ = 1;
  bool training_ = true;
  std::int64_t step_ = 0;
  double aux_loss_ = 0;
  TokenSource source_;
  std::function<void(int, int)> after_forward_;
  std::map<int, MicrobatchTokens> tokens_;
  std::map<std::pair<int, int>, Buffer<T, memory_space>> stash_;
};

namespace cpu {
template <class T, Communicator Comm, class Mlp = moefold::DenseMlp<Cpu, T, Comm>>
using DecoderStage = moefold::DecoderStage<Cpu, T, Comm, Mlp>;
}  // namespace cpu

}  // namespace v0
}  // namespace moefold
