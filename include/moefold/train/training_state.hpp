#pragma once
/// \file
/// The training state in a checkpoint: every parameter shard (in the parameters' type), its
/// AdamW moments ("<name>.exp_avg", "<name>.exp_avg_sq", in the optimizer's moment type) and the
/// optimizer's step count ("optimizer.steps", int64). Restoring assembles each rank's own
/// blocks, so the state loads under another folding. Parameter and moment memory is that of the
/// optimizer's execution instance (`opt.exec()`): entries and reads go through it.

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <type_traits>
#include <vector>

#include "moefold/train/adamw.hpp"
#include "moefold/core/view.hpp"
#include "moefold/train/checkpoint.hpp"

namespace moefold {
inline namespace v0 {

/// The shards this rank writes: the parameters for which `writes(param)` is true (one replica
/// of each, e.g. data-parallel rank 0), with their moments; `with_steps` adds the step count.
/// The entries refer to the parameters' and the optimizer's storage: save them before the next
/// step.
template <class Exec, class T>
std::vector<ShardEntry> training_state_entries(
    AdamW<Exec, T>& opt, std::type_identity_t<std::function<bool(Param<T> const&)>> const& writes,
    bool with_steps) {
  using Moment = typename std::remove_cvref_t<decltype(opt.exp_avg(0))>::value_type;
  using Space = typename Exec::memory_space;
  std::vector<ShardEntry> out;
  auto const& params = opt.params();
  auto const& exec = opt.exec();
  for (std::size_t k = 0; k < params.size(); ++k) {
    Param<T> const& p = *params[k];
    if (!writes(p)) continue;
    out.push_back(ShardEntry::of<Exec, T>(exec, p.name, p.global_rows, p.global_cols, p.blocks,
                                          View<T const, Space>(p.value)));
    out.push_back(ShardEntry::of<Exec, Moment>(exec, p.name + ".exp_avg", p.global_rows,
                                               p.global_cols, p.blocks, opt.exp_avg(k).view()));
    out.push_back(ShardEntry::of<Exec, Moment>(exec, p.name + ".exp_avg_sq", p.global_rows,
                                               p.global_cols, p.blocks, opt.exp_avg_sq(k).view()));
  }
  if (with_steps) {
    std::array<std::int64_t, 1> const steps{opt.steps()};
    out.push_back(ShardEntry::copy("optimizer.steps", 1, 1,
                                   {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 1}},
                                   std::span<std::int64_t const>(steps)));
  }
  return out;
}

/// Loads every parameter's blocks from `ckpt` and nothing else: the optimizer keeps its moments
/// and step count (Megatron's `--finetune` / `--no-load-optim`; a checkpoint converted from
/// Hugging Face holds weights only).
template <class Exec, class T>
void restore_parameters(CheckpointReader const& ckpt, AdamW<Exec, T>& opt) {
  using Space = typename Exec::memory_space;
  for (Param<T>* p : opt.params())
    ckpt.fill<Exec, T>(opt.exec(), p->name, p->global_rows, p->global_cols, p->blocks,
                       View<T, Space>(p->value));
}

/// Loads every parameter's blocks, its moments and the step count from `ckpt`.
template <class Exec, class T>
void restore_training_state(CheckpointReader const& ckpt, AdamW<Exec, T>& opt) {
  using Moment = typename std::remove_cvref_t<decltype(opt.exp_avg(0))>::value_type;
  restore_parameters(ckpt, opt);
  auto const& params = opt.params();
  auto const& exec = opt.exec();
  for (std::size_t k = 0; k < params.size(); ++k) {
    Param<T>& p = *params[k];
    ckpt.fill<Exec, Moment>(exec, p.name + ".exp_avg", p.global_rows, p.global_cols, p.blocks,
                            opt.exp_avg(k).view());
    ckpt.fill<Exec, Moment>(exec, p.name + ".exp_avg_sq", p.global_rows, p.global_cols, p.blocks,
                            opt.exp_avg_sq(k).view());
  }
  std::array<std::int64_t, 1> steps{0};
  ckpt.fill("optimizer.steps", 1, 1, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 1}},
            std::span<std::int64_t>(steps));
  opt.set_steps(steps[0]);
}

}  // namespace v0
}  // namespace moefold
