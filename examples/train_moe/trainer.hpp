#pragma once
// One rank's training run: the folded model, the data order of DESIGN §3, the pipeline schedule,
// gradient reduction and clipping, AdamW with warm-up and cosine decay, validation, and
// checkpoints that load under any folding. Runs on every rank of the world (a thread under
// inproc, a process under MPI); global rank 0 reports.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "model.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/ops/elementwise.hpp"
#include "moefold/ops/gradients.hpp"
#include "moefold/pipeline/executor.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/train/adamw.hpp"
#include "moefold/train/checkpoint.hpp"
#include "moefold/train/checkpoint_config.hpp"
#include "moefold/train/distributed_optimizer.hpp"
#include "moefold/train/finalize_model_grads.hpp"
#include "moefold/train/gradient_reduction.hpp"
#include "moefold/train/lr_schedule.hpp"
#include "moefold/train/microbatch_data.hpp"
#include "moefold/train/mfu.hpp"
#include "moefold/train/training_state.hpp"
#include "options.hpp"
#include "phase_times.hpp"
#include "report.hpp"
#include "tokenizer.hpp"

namespace moefold::train_demo {

/// The checkpoint's settings: the folding, the model (checked when a checkpoint is loaded) and
/// the run (recorded only).
template <class T, Communicator Comm>
CheckpointInfo checkpoint_metadata(TrainOptions const& o) {
  CheckpointInfo info;
  info.folding = folding_entries(FoldedMapping::from(o.folding()));
  info.folding.set("vpp", o.vpp);
  add_config(info, model_config(o));
  add_config(info, mlp_config<T, Comm>(o));
  info.run.set("global_batch_size", o.global_batch)
      .set("train_iters", o.train_iters)
      .set("lr", o.lr)
      .set("min_lr", o.min_lr)
      .set("weight_decay", o.weight_decay)
      .set("clip_grad", o.clip_grad);
  return info;
}

/// `T`: the precision policy's element type — float, or bf16 with --bf16 (FP32 main gradients,
/// main parameters and moments, FP32 loss; core/precision.hpp). `R`: the router's computation
/// type (double with --moe-router-dtype fp64).
template <Communicator Comm, class T = float, class R = compute_t<T>>
class Trainer {
 public:

  /// Builds this rank's model and optimizer and, with --load, restores the training state —
  /// or, with --finetune / --no-load-optim, the weights only (fresh moments; iteration 0 with
  /// --finetune) — and throws when the checkpoint is missing, truncated, corrupted or of another
  /// model, or has no optimizer state to resume: nothing is written then.
  /// Collective over `world`.
  Trainer(TrainOptions const& o, Comm world, Report* report)
      : o_(o),
        groups_(FoldedMapping::from(o.folding()), std::move(world)),
        corpus_(load_corpus(o)),
        stage_(model_config(o), mlp_config<T, Comm>(o), groups_, o.vpp),
        params_(stage_.parameters()),
        schedule_{.lr = o.lr,
                  .min_lr = o.min_lr,
                  .warmup_iters = o.warmup(),
                  .decay_iters = o.train_iters},
        shard_(SequenceShard::of(groups_, o.seq, o.micro_batch)),
        report_(report) {
    AdamWConfig const adam{.weight_decay = o.weight_decay};
    if (o.use_distributed_optimizer)
      dist_.emplace(stage_.exec(), params_, groups_, adam);
    else
      adam_.emplace(stage_.exec(), params_, adam);
    if (!o.load.empty()) {
      auto const ckpt = o.ckpt_step >= 0 ? CheckpointReader::open(o.load, o.ckpt_step)
                                         : CheckpointReader::open(o.load);
      ckpt.check_model(checkpoint_metadata<T, Comm>(o).model);
      if (o.finetune || o.no_load_optim) {
        with_optimizer([&](auto& opt) { restore_parameters(ckpt, opt); });
        first_step_ = o.finetune ? 0 : ckpt.step();
      } else {
        if (!ckpt.contains("optimizer.steps"))
          throw error(errc::invalid_argument,
                      fmt::format("checkpoint {} iteration {} holds weights only, no optimizer "
                                  "state (a conversion from Hugging Face?): load it with "
                                  "--finetune or --no-load-optim",
                                  o.load, ckpt.step()));
        first_step_ = with_optimizer([&](auto& opt) {
          restore_training_state(ckpt, opt);
          return opt.steps();
        });
      }
    }
  }

  std::int64_t first_step() const noexcept { return first_step_; }

  void run() {
    std::int64_t const params = count_parameters();
    if (report_) report_->start(banner(params), first_step_);
    std::int64_t const eval_every =
        o_.eval_interval > 0 ? o_.eval_interval : std::max(1, o_.train_iters / 4);
    Summary summary;
    summary.unigram_entropy = corpus_.unigram_entropy();
    summary.bytes_per_token = corpus_.bytes_per_token(Split::validation);
    summary.parameters = params;
    summary.memory = memory_bytes();
    summary.ranks = groups_.world().size();
    summary.model_flops_per_step = model_flops_per_step(o_);
    summary.gemm_peak_per_rank = measured_gemm_peak();
    Stopwatch run_clock;
    for (std::int64_t step = first_step_ + 1; step <= o_.train_iters; ++step) {
      Stopwatch w;
      std::clock_t const cpu_start = std::clock();  // the process's CPU time, every thread
      StepRecord r = named(fmt::format("step {}", step), [&] { return train_step(step); });
      r.seconds = w.seconds();
      r.cpu_seconds = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
      r.tokens_per_s = static_cast<double>(o_.global_batch * o_.seq) / r.seconds;
      summary.train_seconds += r.seconds;
      summary.tokens += std::int64_t{o_.global_batch} * o_.seq;
      summary.final_train_loss = r.loss;
      ++summary.steps;
      if (report_) report_->step(r, summary.train_seconds);
      if (step % eval_every == 0 && step != o_.train_iters && o_.eval_iters > 0) {
        Stopwatch e;
        double const val =
            named(fmt::format("validation after step {}", step), [&] { return validation_loss(); });
        summary.eval_seconds += e.seconds();
        if (report_) report_->validation(step, val);
      }
      if (!o_.save.empty() &&
          ((o_.save_interval > 0 && step % o_.save_interval == 0) || step == o_.train_iters))
        save(step);
    }
    if (o_.eval_iters > 0) {  // of the model as it ends: at --train-iters, or the checkpoint's
      Stopwatch e;
      summary.final_val_loss = named("the final validation", [&] { return validation_loss(); });
      summary.eval_seconds += e.seconds();
      if (report_)
        report_->validation(std::max<std::int64_t>(first_step_, o_.train_iters),
                            *summary.final_val_loss);
    }
    summary.phases = mean_phase_times();
    if (report_) report_->finish(summary);
  }

 private:
  StepRecord train_step(std::int64_t step) {
    for (auto const& g : kTrafficGroups)
      if (has_group(g.second)) groups_.get(g.second).reset_traffic();
    for (auto* p : params_)
      ops::fill(stage_.exec(), View<grad_t<T>, Space>(p->grad), grad_t<T>{});
    // Step s (1-based) trains on the global batch of stream index s − 1.
    auto const first =
        static_cast<std::uint64_t>(step - 1) * static_cast<std::uint64_t>(o_.global_batch);
    StepRecord r{.step = step, .lr = schedule_.at(step)};
    auto const [loss, aux] = run_batch(Split::train, first, step);
    r.loss = loss;
    r.aux_loss = aux;
    Stopwatch w;
    FinalizeOptions const fin{.calculate_per_token_loss = o_.calculate_per_token_loss};
    // --clip-grad 0 means no clipping, as in Megatron.
    if (dist_) {
      finalize_model_grads(stage_, groups_, *dist_, fin);
      r.grad_norm = o_.clip_grad > 0 ? dist_->clip_grad_norm(o_.clip_grad) : dist_->grad_norm();
    } else {
      finalize_model_grads(stage_, groups_, fin);
      r.grad_norm = o_.clip_grad > 0
                        ? clip_grad_norm(stage_.exec(), params_, groups_, o_.clip_grad)
                        : global_grad_norm(stage_.exec(), params_, groups_);
    }
    if (o_.check_for_nan) check_finite(r.loss, r.grad_norm);
    with_optimizer([&](auto& opt) { opt.step(r.lr); });
    phase_times().optimizer += w.seconds();
    std::vector<double> bytes(kTrafficGroups.size());
    for (std::size_t g = 0; g < kTrafficGroups.size(); ++g)
      if (has_group(kTrafficGroups[g].second))
        bytes[g] =
            static_cast<double>(groups_.get(kTrafficGroups[g].second).traffic().total_sent());
    groups_.world().all_reduce(std::span<double>(bytes));
    for (std::size_t g = 0; g < bytes.size(); ++g) r.megabytes[g] = bytes[g] / 1e6;
    return r;
  }

  /// Returns `fn()`; an error it throws is rethrown naming `what` (the step) and this rank,
  /// unless it only echoes another rank's failure or a timeout.
  template <class Fn>
  auto named(std::string const& what, Fn&& fn) {
    try {
      return fn();
    } catch (error const& e) {
      if (e.category() == errc::aborted || e.category() == errc::timeout) throw;
      throw error(e.category(),
                  fmt::format("{} on rank {}: {}", what, groups_.world().rank(), e.what()));
    }
  }

  /// Megatron's --check-for-nan-in-loss-and-grad: a NaN or infinite loss or gradient norm ends
  /// the run before the optimizer applies it. Both values are global (the same on every rank),
  /// so every rank throws, naming the ranks whose own share of the loss, or whose gradients,
  /// are not finite (one all-reduce, only then); run() adds the step. Clipping keeps a
  /// non-finite gradient non-finite (a NaN norm scales nothing; an infinite one makes inf·0).
  void check_finite(double loss, double grad_norm) {
    if (std::isfinite(loss) && std::isfinite(grad_norm)) return;
    auto& world = groups_.world();
    auto const w = static_cast<std::size_t>(world.size());
    std::vector<double> bad(2 * w, 0.0);  // [own loss | own gradients] per rank
    bool grads_finite = true;
    for (auto* p : params_) grads_finite = grads_finite && first_non_finite(p->grad) < 0;
    bad[static_cast<std::size_t>(world.rank())] = local_loss_finite_ ? 0.0 : 1.0;
    bad[w + static_cast<std::size_t>(world.rank())] = grads_finite ? 0.0 : 1.0;
    world.all_reduce(std::span<double>(bad));
    auto ranks = [&](std::size_t offset) {
      std::vector<std::size_t> out;
      for (std::size_t r = 0; r < w; ++r)
        if (bad[offset + r] > 0) out.push_back(r);
      return out;
    };
    auto const by_loss = ranks(0), by_grad = ranks(w);
    std::string const where =
        !by_loss.empty()
            ? fmt::format("the loss is not finite on rank {}", fmt::join(by_loss, ", "))
        : !by_grad.empty()
            ? fmt::format("the gradients are not finite on rank {}", fmt::join(by_grad, ", "))
            : std::string("every rank's own loss and gradients are finite, their sum is not");
    throw error(errc::invalid_argument,
                fmt::format("the loss is {} and the gradient norm is {}; {} (Megatron's check; "
                            "--no-check-for-nan-in-loss-and-grad lets the run go on)",
                            loss, grad_norm, where));
  }

  /// One pass of the global batch whose first stream sequence is `first` through the pipeline
  /// (forward and backward for a training `step` ≥ 1; forward only for step 0, validation);
  /// returns the LM loss averaged over the global batch and the auxiliary loss (Σ over layers,
  /// mean over microbatches and DP), on every rank.
  std::pair<double, double> run_batch(Split split, std::uint64_t first, std::int64_t step) {
    int const m = o_.microbatches();
    stage_.begin_step(
        m,
        [this, split, first](int mb) {
          return microbatch_tokens(corpus_, split, first, mb, shard_, o_.seed);
        },
        /*training=*/step > 0, step);
    TimedStage<Model<T, Comm, R>> timed(stage_);
    Stopwatch w;
    auto const loss =
        o_.vpp > 1
            ? run_pipeline(
                  Interleaved{.stages = o_.pp, .virtual_stages = o_.vpp, .microbatches = m},
                  groups_.pp(), timed)
                  .loss
            : run_pipeline(OneFOneB{.stages = o_.pp, .microbatches = m}, groups_.pp(), timed).loss;
    phase_times().pipeline += w.seconds();
    local_loss_finite_ = std::isfinite(loss) && std::isfinite(stage_.aux_loss());
    // The last stage holds Σ_mb mean(own tokens)/M; the mean over dp_cp replicas is the global
    // batch's mean; the other stages contribute 0 to the sum over pp.
    // The TP·CP ranks of a replica hold parts of its auxiliary loss (summed over tp_cp), each
    // stage its layers' share (summed over pp).
    // Per-token mode: the last stage holds Σ_mb Σ own-token losses instead; its mean over the
    // global batch divides by every token of it.
    double const lm = o_.calculate_per_token_loss
                          ? static_cast<double>(loss) * o_.dp() * o_.cp /
                                static_cast<double>(o_.global_batch * o_.seq)
                          : static_cast<double>(loss);
    // (The per-token form of an auxiliary loss carries a factor of the microbatch's tokens.)
    double const aux_unit =
        o_.calculate_per_token_loss ? static_cast<double>(o_.seq) * o_.micro_batch : 1.0;
    std::vector<double> v{lm}, aux{stage_.aux_loss() / m / aux_unit};
    groups_.dp_cp().all_reduce(std::span<double>(v));
    v[0] /= static_cast<double>(groups_.mapping().dp() * groups_.mapping().cp());
    groups_.tp_dp_cp().all_reduce(std::span<double>(aux));
    v.push_back(aux[0] / groups_.mapping().dp());
    groups_.pp().all_reduce(std::span<double>(v));
    return {v[0], v[1]};
  }

  /// The mean loss of --eval-iters global batches of the validation split (forward only; the
  /// phase counters are left as they were).
  double validation_loss() {
    PhaseTimes const kept = phase_times();
    double sum = 0;
    for (int i = 0; i < o_.eval_iters; ++i)
      sum += run_batch(Split::validation, static_cast<std::uint64_t>(i) * o_.global_batch, 0).first;
    phase_times() = kept;
    return sum / o_.eval_iters;
  }

  /// One replica of every parameter element: dense shards on dp_cp rank 0, TP-replicated ones
  /// also on tp rank 0 only, expert shards on edp rank 0.
  bool writes(Param<T> const& p) {
    switch (p.cls) {
      case ParamClass::dense:
        return groups_.dp_cp().rank() == 0;
      case ParamClass::tp_replicated:
        return groups_.dp_cp().rank() == 0 && groups_.tp().rank() == 0;
      case ParamClass::expert:
        return groups_.edp().rank() == 0;
    }
    return false;
  }

  void save(std::int64_t step) {
    auto const entries = with_optimizer([&](auto& opt) {
      return training_state_entries(
          opt, [this](Param<T> const& p) { return writes(p); }, groups_.world().rank() == 0);
    });
    save_checkpoint(stage_.exec(), groups_.world(), o_.save, step, entries,
                    checkpoint_metadata<T, Comm>(o_), {.keep_last = o_.keep_last});
    if (report_) report_->checkpoint(step, o_.save);
  }

  std::int64_t count_parameters() {
    std::vector<double> n{0.0};
    for (auto* p : params_)
      if (writes(*p)) n[0] += static_cast<double>(p->size());
    groups_.world().all_reduce(std::span<double>(n));
    return static_cast<std::int64_t>(n[0]);
  }

  PhaseTimes mean_phase_times() {
    PhaseTimes const& p = phase_times();
    std::vector<double> v{p.compute, p.mlp, p.dispatch, p.combine, p.pipeline, p.optimizer};
    groups_.world().all_reduce(std::span<double>(v));
    for (auto& x : v) x /= groups_.world().size();
    return {v[0], v[1], v[2], v[3], v[4], v[5]};
  }

  std::string banner(std::int64_t params) const {
    auto const& f = groups_.mapping();
    return fmt::format(
        "moefold-train: {} parameters, {} layers, hidden {}, {} heads / {} query groups, MLP slot "
        "{}{}\n"
        "  data: {} ({} files, {:.2f} MB{}): train {} / "
        "validation {} bytes, byte-unigram entropy {:.4f} nats\n"
        "{}"
        "  folding: {} ranks, attention TP{}·CP{}·PP{}·DP{}, MoE EP{}·ETP{}·EDP{}, {}; global "
        "batch {} × {} tokens in {} microbatches of {}\n",
        params, o_.num_layers, o_.hidden, o_.heads, o_.kv_groups, mlp_description(o_),
        o_.bf16 ? "; BF16 mixed precision (FP32 accumulation, loss, main gradients and "
                  "parameters)"
                : "",
        data_path_of(o_), corpus_.files(), static_cast<double>(corpus_.size()) / 1e6,
        o_.data_path.empty() ? "; Debian package 'fortunes', BSD license" : "",
        corpus_.split_size(Split::train), corpus_.split_size(Split::validation),
        corpus_.unigram_entropy(),
        corpus_.is_tokenized()
            ? fmt::format("  tokens: SentencePiece {} (vocabulary {}, padded to {}): train {} / "
                          "validation {} tokens, {:.3f} bytes per token\n",
                          o_.tokenizer_model, o_.tokenizer_vocab, o_.padded_vocab(),
                          corpus_.split_tokens(Split::train),
                          corpus_.split_tokens(Split::validation),
                          corpus_.bytes_per_token(Split::train))
            : std::string(),
        f.world_size(), f.tp(), f.cp(), f.pp(), f.dp(), f.ep(), f.etp(), f.edp(),
        o_.vpp > 1 ? fmt::format("interleaved 1F1B (VPP {})", o_.vpp) : "1F1B", o_.global_batch,
        o_.seq, o_.microbatches(), o_.micro_batch);
  }

  using Space = typename Exec::memory_space;

  /// The first index of a non-finite element of `v`, or −1.
  std::int64_t first_non_finite(View<grad_t<T> const, Space> v) {
    ops::first_non_finite(stage_.exec(), v, first_bad_.view());
    Buffer<std::int64_t> at(1);
    copy(stage_.exec(), View<std::int64_t const, Space>(first_bad_.view()), at.view());
    stage_.exec().fence();
    return at[0];
  }

  /// Whether the folding has groups of kind `g` (the partial ones need several optimizer
  /// instances).
  bool has_group(Group g) const {
    return groups_.mapping().num_distributed_optimizer_instances() > 1 ||
           (g != Group::intra_partial_dp_cp && g != Group::intra_partial_edp &&
            g != Group::inter_partial_edp && g != Group::intra_dist_opt_instance);
  }

  /// `f(optimizer)`: AdamW, or the distributed optimizer with --use-distributed-optimizer.
  template <class F>
  decltype(auto) with_optimizer(F&& f) {
    return dist_ ? f(*dist_) : f(*adam_);
  }

  /// The dense GEMM rate of a rank (FLOP/s), measured on every rank's instance at once (ranks
  /// in one process share its cores): the mean over ranks.
  double measured_gemm_peak() {
    std::vector<double> v{
        gemm_peak_flops(stage_.exec(), 256, 20, [this] { groups_.world().barrier(); })};
    groups_.world().all_reduce(std::span<double>(v));
    return v[0] / groups_.world().size();
  }

  /// Bytes this rank allocates for parameters, gradients (the parameters' own and, with the
  /// distributed optimizer, the reduced shards) and optimizer state (the moments, and with
  /// --bf16 the FP32 main parameters), counted from the buffers; the largest over ranks, and
  /// every rank's (with its PP rank).
  MemoryBytes memory_bytes() {
    std::vector<double> v(3, 0.0);
    for (auto* p : params_) {
      v[0] += static_cast<double>(p->value.size() * sizeof(*p->value.data()));
      v[1] += static_cast<double>(p->grad.size() * sizeof(*p->grad.data()));
    }
    if (dist_) {
      v[1] += static_cast<double>(dist_->shard_grad_bytes());
      v[2] = static_cast<double>(dist_->state_bytes());
    } else {
      v[2] = static_cast<double>(adam_->state_bytes());
    }
    // Every rank's {PP rank, bytes}, summed into place; the summary shows the largest.
    auto const ranks = static_cast<std::size_t>(groups_.world().size());
    std::vector<double> all(4 * ranks, 0.0);
    auto const at = 4 * static_cast<std::size_t>(groups_.world().rank());
    all[at] = groups_.pp().rank();
    std::copy(v.begin(), v.end(), all.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    groups_.world().all_reduce(std::span<double>(all));
    MemoryBytes m;
    for (std::size_t r = 0; r < ranks; ++r) {
      std::array<std::int64_t, 4> row{};
      for (std::size_t k = 0; k < row.size(); ++k)
        row[k] = static_cast<std::int64_t>(all[4 * r + k]);
      m.parameters = std::max(m.parameters, row[1]);
      m.gradients = std::max(m.gradients, row[2]);
      m.optimizer = std::max(m.optimizer, row[3]);
      m.per_rank.push_back(row);
    }
    return m;
  }

  TrainOptions const& o_;
  ProcessGroups<Comm> groups_;
  TextCorpus corpus_;
  Model<T, Comm, R> stage_;
  ParamList<T> params_;
  std::optional<AdamW<Exec, T>> adam_;
  std::optional<DistributedOptimizer<Exec, T, Comm>> dist_;
  Buffer<std::int64_t, Space> first_bad_ = stage_.exec().template allocate<std::int64_t>(1);
  LrSchedule schedule_;
  SequenceShard shard_;
  Report* report_;
  std::int64_t first_step_ = 0;
  bool local_loss_finite_ = true;  ///< this rank's share of the last batch's loss
};

/// The router's computation type for layers of `T`: `compute_t<T>` (--moe-router-dtype unset or
/// fp32), or double (fp64).
template <class T>
using RouterOf = compute_t<T>;
template <class>
using Fp64RouterOf = double;

/// This rank's run in the precision --bf16 picks (bf16 parameters and activations with FP32
/// main gradients, main parameters and moments; float otherwise), the router computing in
/// `Router<T>`. Collective over `world`.
template <template <class> class Router, class Comm>
void run_in_precision(TrainOptions const& o, Comm& world, Report* report) {
  if (o.bf16)
    Trainer<Comm, bf16, Router<bf16>>(o, world, report).run();
  else
    Trainer<Comm, float, Router<float>>(o, world, report).run();
}

}  // namespace moefold::train_demo
