#pragma once
// What the user sees (global rank 0 only): a progress line per step, JSON Lines (--log-json) and
// CSV rows (loss.csv) as the steps end, and at the end a summary and the loss curve as SVG. A
// fresh run starts --log-json and loss.csv anew; a resumed run keeps their rows up to the
// checkpoint's step and appends. Every file error names the file and the reason.

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "options.hpp"
#include "phase_times.hpp"

namespace moefold::train_demo {

/// The group kinds whose traffic the progress line shows.
inline constexpr std::array<std::pair<char const*, Group>, 10> kTrafficGroups{{
    {"tp", Group::tp},
    {"cp", Group::cp},
    {"pp", Group::pp},
    {"ep", Group::ep},
    {"etp", Group::etp},
    {"dp_cp", Group::dp_cp},
    {"edp", Group::edp},
    // With --num-distributed-optimizer-instances > 1 only (the distributed optimizer's groups).
    {"intra_dp_cp", Group::intra_partial_dp_cp},
    {"intra_edp", Group::intra_partial_edp},
    {"inter_edp", Group::inter_partial_edp},
}};

struct StepRecord {
  std::int64_t step = 0;  ///< 1-based
  double loss = 0;        ///< LM loss averaged over the global batch
  double aux_loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double seconds = 0;  ///< wall time of the step
  double cpu_seconds = 0;  ///< CPU time of the process (all threads) during the step
  double tokens_per_s = 0;
  std::array<double, kTrafficGroups.size()> megabytes{};  ///< bytes sent, Σ over ranks
};

/// Bytes one rank allocates (the largest over ranks), counted from the buffers.
struct MemoryBytes {
  std::int64_t parameters = 0;
  std::int64_t gradients = 0;
  std::int64_t optimizer = 0;  ///< optimizer state (the AdamW moments)
  /// Every rank's bytes, by global rank: {PP rank, parameters, gradients, optimizer}
  /// (`memory.json` in the output directory).
  std::vector<std::array<std::int64_t, 4>> per_rank;
};

struct Summary {
  double train_seconds = 0;  ///< the training loop (steps only)
  double eval_seconds = 0;
  std::int64_t tokens = 0;  ///< tokens trained on in this run
  std::int64_t steps = 0;   ///< steps run in this run (0: the checkpoint was at --train-iters)
  double final_train_loss = 0;
  std::optional<double> final_val_loss;  ///< none with --eval-iters 0
  double unigram_entropy = 0;            ///< of the train split's bytes, nats per byte
  double bytes_per_token = 1;            ///< of the validation split (1: byte-level)
  std::int64_t parameters = 0;
  MemoryBytes memory;  ///< per rank
  PhaseTimes phases;  ///< mean over ranks, seconds
  int ranks = 1;
  double model_flops_per_step = 0;  ///< Megatron's formula
  double gemm_peak_per_rank = 0;    ///< FLOP/s, measured at start-up on every rank at once
};

class Report {
 public:
  explicit Report(TrainOptions const& o) : o_(o) {}

  /// Before training: creates the output directory, starts (fresh run) or continues (resumed
  /// run: `first_step` > 0 is the loaded checkpoint's step) --log-json and loss.csv, and prints
  /// the banner (the corpus, the model and the folding).
  void start(std::string const& banner, std::int64_t first_step);
  /// A step's progress line and JSON line; its CSV row follows with its validation, if any.
  void step(StepRecord const& r, double elapsed);
  void validation(std::int64_t step, double loss);
  void checkpoint(std::int64_t step, std::string const& dir);
  /// Prints the summary (no validation line without a validation, no train loss without a
  /// step), ends loss.csv and writes loss.svg.
  void finish(Summary const& s);

 private:
  void write_row();
  void write_svg(double baseline) const;
  void write_memory_json(MemoryBytes const& m) const;

  TrainOptions const& o_;
  std::int64_t first_step_ = 0;
  std::filesystem::path csv_path_;
  struct Row {
    StepRecord step;
    std::optional<double> validation_loss;  ///< when a validation ran after this step
  };
  std::vector<Row> rows_;     ///< kept rows of a resumed run's CSV, then this run's steps
  bool row_pending_ = false;  ///< rows_.back() waits for its validation
  std::ofstream json_, csv_;
};

}  // namespace moefold::train_demo
