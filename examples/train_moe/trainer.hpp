#pragma once
// One rank's training run: the folded model, the data order of DESIGN §3, the pipeline schedule,
// gradient reduction and clipping, AdamW with warm-up and cosine decay, validation, and
// checkpoints that load under any folding. Runs on every rank of the world (a thread under
// inproc, a process under MPI); global rank 0 reports.

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "model.hpp"
#include "moefold/comm/process_groups.hpp"
#include "moefold/pipeline/executor.hpp"
#include "moefold/pipeline/interleaved.hpp"
#include "moefold/pipeline/one_f_one_b.hpp"
#include "moefold/train/adamw.hpp"
#include "moefold/train/checkpoint.hpp"
#include "moefold/train/finalize_model_grads.hpp"
#include "moefold/train/gradient_reduction.hpp"
#include "moefold/train/lr_schedule.hpp"
#include "moefold/train/microbatch_data.hpp"
#include "moefold/train/training_state.hpp"
#include "options.hpp"
#include "phase_times.hpp"
#include "report.hpp"

namespace moefold::train_demo {

/// The checkpoint's metadata: what was trained and under which folding.
inline std::string checkpoint_metadata(TrainOptions const& o, std::int64_t step) {
  return fmt::format(
      "{{\"iteration\": {}, \"model\": {{\"num_layers\": {}, \"hidden_size\": {}, "
      "\"num_attention_heads\": {}, \"num_query_groups\": {}, \"num_experts\": {}, "
      "\"moe_router_topk\": {}, \"moe_ffn_hidden_size\": {}, \"vocab_size\": 256}}, "
      "\"folding\": {{\"world_size\": {}, \"tp\": {}, \"cp\": {}, \"pp\": {}, \"vpp\": {}, "
      "\"dp\": {}, \"ep\": {}, \"etp\": {}}}, \"seed\": {}, \"global_batch_size\": {}, "
      "\"seq_length\": {}}}\n",
      step, o.num_layers, o.hidden, o.heads, o.kv_groups, o.num_experts, o.topk, o.moe_ffn, o.world,
      o.tp, o.cp, o.pp, o.vpp, o.dp(), o.ep, o.etp, o.seed, o.global_batch, o.seq);
}

template <Communicator Comm>
class Trainer {
 public:
  using T = float;

  /// Builds this rank's model and optimizer and, with --load, restores the training state
  /// (throws when the checkpoint is missing, truncated or corrupted: nothing is written then).
  /// Collective over `world`.
  Trainer(TrainOptions const& o, Comm world, Report* report)
      : o_(o),
        groups_(FoldedMapping::from(o.folding()), std::move(world)),
        corpus_(TextCorpus::load(data_path_of(o))),
        stage_(model_config(o), mlp_config<T, Comm>(o), groups_, o.vpp),
        params_(stage_.parameters()),
        opt_(params_, AdamWConfig{.weight_decay = o.weight_decay}),
        schedule_{.lr = o.lr,
                  .min_lr = o.min_lr,
                  .warmup_iters = o.warmup(),
                  .decay_iters = o.train_iters},
        shard_(SequenceShard::of(groups_, o.seq, o.micro_batch)),
        report_(report) {
    if (!o.load.empty()) {
      auto const ckpt = o.ckpt_step >= 0 ? CheckpointReader::open(o.load, o.ckpt_step)
                                         : CheckpointReader::open(o.load);
      restore_training_state(ckpt, opt_);
      first_step_ = opt_.steps();
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
    summary.parameters = params;
    Stopwatch run_clock;
    for (std::int64_t step = first_step_ + 1; step <= o_.train_iters; ++step) {
      Stopwatch w;
      StepRecord r = train_step(step);
      r.seconds = w.seconds();
      r.tokens_per_s = static_cast<double>(o_.global_batch * o_.seq) / r.seconds;
      summary.train_seconds += r.seconds;
      summary.tokens += std::int64_t{o_.global_batch} * o_.seq;
      summary.final_train_loss = r.loss;
      if (report_) report_->step(r, summary.train_seconds);
      if (step % eval_every == 0 && step != o_.train_iters && o_.eval_iters > 0) {
        Stopwatch e;
        double const val = validation_loss();
        summary.eval_seconds += e.seconds();
        if (report_) report_->validation(step, val);
      }
      if (!o_.save.empty() &&
          ((o_.save_interval > 0 && step % o_.save_interval == 0) || step == o_.train_iters))
        save(step);
    }
    if (o_.eval_iters > 0) {
      Stopwatch e;
      summary.final_val_loss = validation_loss();
      summary.eval_seconds += e.seconds();
      if (report_) report_->validation(o_.train_iters, summary.final_val_loss);
    }
    summary.phases = mean_phase_times();
    if (report_) report_->finish(summary);
  }

 private:
  StepRecord train_step(std::int64_t step) {
    for (auto const& g : kTrafficGroups) groups_.get(g.second).reset_traffic();
    for (auto* p : params_) p->zero_grad();
    // Step s (1-based) trains on the global batch of stream index s − 1.
    auto const first =
        static_cast<std::uint64_t>(step - 1) * static_cast<std::uint64_t>(o_.global_batch);
    StepRecord r{.step = step, .lr = schedule_.at(step)};
    auto const [loss, aux] = run_batch(Split::train, first, step);
    r.loss = loss;
    r.aux_loss = aux;
    Stopwatch w;
    finalize_model_grads(stage_, groups_,
                         {.calculate_per_token_loss = o_.calculate_per_token_loss});
    r.grad_norm = clip_grad_norm(params_, groups_, o_.clip_grad);
    opt_.step(r.lr);
    phase_times().optimizer += w.seconds();
    std::vector<double> bytes(kTrafficGroups.size());
    for (std::size_t g = 0; g < kTrafficGroups.size(); ++g)
      bytes[g] = static_cast<double>(groups_.get(kTrafficGroups[g].second).traffic().total_sent());
    groups_.world().all_reduce(std::span<double>(bytes));
    for (std::size_t g = 0; g < bytes.size(); ++g) r.megabytes[g] = bytes[g] / 1e6;
    return r;
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
    TimedStage<Model<T, Comm>> timed(stage_);
    Stopwatch w;
    T const loss =
        o_.vpp > 1
            ? run_pipeline(
                  Interleaved{.stages = o_.pp, .virtual_stages = o_.vpp, .microbatches = m},
                  groups_.pp(), timed)
                  .loss
            : run_pipeline(OneFOneB{.stages = o_.pp, .microbatches = m}, groups_.pp(), timed).loss;
    phase_times().pipeline += w.seconds();
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
    auto const entries = training_state_entries<T>(
        opt_, [this](Param<T> const& p) { return writes(p); }, groups_.world().rank() == 0);
    save_checkpoint(groups_.world(), o_.save, step, entries, checkpoint_metadata(o_, step));
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
        "{}\n"
        "  data: {} ({} files, {:.2f} MB{}): train {} / "
        "validation {} bytes, byte-unigram entropy {:.4f} nats\n"
        "  folding: {} ranks, attention TP{}·CP{}·PP{}·DP{}, MoE EP{}·ETP{}·EDP{}, {}; global "
        "batch {} × {} tokens in {} microbatches of {}\n",
        params, o_.num_layers, o_.hidden, o_.heads, o_.kv_groups, mlp_description(o_),
        data_path_of(o_), corpus_.files(), static_cast<double>(corpus_.size()) / 1e6,
        o_.data_path.empty() ? "; Debian package 'fortunes', BSD license" : "",
        corpus_.split_size(Split::train), corpus_.split_size(Split::validation),
        corpus_.unigram_entropy(), f.world_size(), f.tp(), f.cp(), f.pp(), f.dp(), f.ep(), f.etp(),
        f.edp(), o_.vpp > 1 ? fmt::format("interleaved 1F1B (VPP {})", o_.vpp) : "1F1B",
        o_.global_batch, o_.seq, o_.microbatches(), o_.micro_batch);
  }

  TrainOptions const& o_;
  ProcessGroups<Comm> groups_;
  TextCorpus corpus_;
  Model<T, Comm> stage_;
  ParamList<T> params_;
  AdamW<T> opt_;
  LrSchedule schedule_;
  SequenceShard shard_;
  Report* report_;
  std::int64_t first_step_ = 0;
};

}  // namespace moefold::train_demo
