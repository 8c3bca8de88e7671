#pragma once
/// \file
/// The training state in a checkpoint: every parameter shard, its AdamW moments
/// ("<name>.exp_avg", "<name>.exp_avg_sq") and the optimizer's step count ("optimizer.steps").
/// Restoring assembles each rank's own blocks, so the state loads under another folding.

#include <functional>
#include <span>
#include <vector>

#include "moefold/train/adamw.hpp"
#include "moefold/train/checkpoint.hpp"

namespace moefold {
inline namespace v0 {

/// The shards this rank writes: the parameters for which `writes(param)` is true (one replica
/// of each, e.g. data-parallel rank 0), with their moments; `with_steps` adds the step count.
template <class T>
std::vector<ShardEntry> training_state_entries(AdamW<T>& opt,
                                               std::function<bool(Param<T> const&)> const& writes,
                                               bool with_steps) {
  std::vector<ShardEntry> out;
  auto const& params = opt.params();
  for (std::size_t k = 0; k < params.size(); ++k) {
    Param<T> const& p = *params[k];
    if (!writes(p)) continue;
    ShardEntry e{p.name, p.global_rows, p.global_cols, p.blocks, {}};
    e.data.assign(p.value.begin(), p.value.end());
    out.push_back(e);
    e.name = p.name + ".exp_avg";
    e.data = opt.exp_avg(k);
    out.push_back(e);
    e.name = p.name + ".exp_avg_sq";
    e.data = opt.exp_avg_sq(k);
    out.push_back(std::move(e));
  }
  if (with_steps)
    out.push_back({"optimizer.steps", 1, 1, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 1}},
                   {static_cast<double>(opt.steps())}});
  return out;
}

/// Loads every parameter's blocks, its moments and the step count from `ckpt`.
template <class T>
void restore_training_state(CheckpointReader const& ckpt, AdamW<T>& opt) {
  auto const& params = opt.params();
  for (std::size_t k = 0; k < params.size(); ++k) {
    Param<T>& p = *params[k];
    std::vector<double> values(p.size());
    ckpt.fill(p.name, p.global_rows, p.global_cols, p.blocks, std::span<double>(values));
    for (std::size_t i = 0; i < values.size(); ++i) p.value[i] = static_cast<T>(values[i]);
    ckpt.fill(p.name + ".exp_avg", p.global_rows, p.global_cols, p.blocks,
              std::span<double>(opt.exp_avg(k)));
    ckpt.fill(p.name + ".exp_avg_sq", p.global_rows, p.global_cols, p.blocks,
              std::span<double>(opt.exp_avg_sq(k)));
  }
  double steps = 0;
  ckpt.fill("optimizer.steps", 1, 1, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 1}},
            std::span<double>(&steps, 1));
  opt.set_steps(static_cast<std::int64_t>(steps));
}

}  // namespace v0
}  // namespace moefold
