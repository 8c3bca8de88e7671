#pragma once
// What the user sees (global rank 0 only): a progress line per step, JSON Lines (--log-json),
// and at the end a summary, the loss curve as SVG and the per-step numbers as CSV.

#include <array>
#include <cstdint>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "options.hpp"
#include "phase_times.hpp"

namespace moefold::train_demo {

/// The group kinds whose traffic the progress line shows.
inline constexpr std::array<std::pair<char const*, Group>, 7> kTrafficGroups{{
    {"tp", Group::tp},
    {"cp", Group::cp},
    {"pp", Group::pp},
    {"ep", Group::ep},
    {"etp", Group::etp},
    {"dp_cp", Group::dp_cp},
    {"edp", Group::edp},
}};

struct StepRecord {
  std::int64_t step = 0;  ///< 1-based
  double loss = 0;        ///< LM loss averaged over the global batch
  double aux_loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double seconds = 0;  ///< wall time of the step
  double tokens_per_s = 0;
  std::array<double, kTrafficGroups.size()> megabytes{};  ///< bytes sent, Σ over ranks
};

struct Summary {
  double train_seconds = 0;  ///< the training loop (steps only)
  double eval_seconds = 0;
  std::int64_t tokens = 0;  ///< tokens trained on in this run
  double final_train_loss = 0;
  double final_val_loss = 0;
  double unigram_entropy = 0;
  std::int64_t parameters = 0;
  PhaseTimes phases;  ///< mean over ranks, seconds
};

class Report {
 public:
  explicit Report(TrainOptions const& o) : o_(o) {}

  /// Before training: the corpus, the model and the folding; `first_step` is the last step of a
  /// loaded checkpoint (0 for a fresh run).
  void start(std::string const& banner, std::int64_t first_step);
  void step(StepRecord const& r, double elapsed);
  void validation(std::int64_t step, double loss);
  void checkpoint(std::int64_t step, std::string const& dir);
  /// Prints the summary and writes loss.csv and loss.svg into the output directory.
  void finish(Summary const& s);

 private:
  void write_csv() const;
  void write_svg(double baseline) const;

  TrainOptions const& o_;
  std::int64_t first_step_ = 0;
  std::vector<StepRecord> steps_;
  std::vector<std::pair<std::int64_t, double>> validation_;
  std::ofstream json_;
};

}  // namespace moefold::train_demo
