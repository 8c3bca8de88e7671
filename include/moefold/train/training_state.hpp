#pragma once
/// \file
/// The training state in a checkpoint: every parameter shard (in the parameters' type), its
/// AdamW moments ("<name>.exp_avg", "<name>.exp_avg_sq", in the optimizer's moment type) and the
/// optimizer's step count ("optimizer.steps", int64). Restoring assembles each rank's own
/// blocks, so the state loads under another folding. The distributed optimizer saves the same
/// tensors: each rank the moments of its shard, as the global blocks they cover (a shard that
/// cuts a row gives 1-row blocks), so either optimizer loads what either saved. Parameter and moment memory is that of the
/// optimizer's execution instance (`opt.exec()`): entries and reads go through it.
///
/// A bf16 model (Megatron's `--bf16`) saves its parameters as bf16 and the optimizer's FP32
/// main parameters as "<name>.main_param" beside the moments. Restoring a bf16 model takes its
/// main parameters from "<name>.main_param", or from an FP32 checkpoint's "<name>" (exactly);
/// restoring a float model from a bf16 checkpoint takes the FP32 "<name>.main_param" as its
/// parameters (the bf16 copy is their rounding). So either precision resumes from either.

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "moefold/train/adamw.hpp"
#include "moefold/train/distributed_optimizer.hpp"
#include "moefold/core/view.hpp"
#include "moefold/train/checkpoint.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
inline ShardEntry steps_entry(std::int64_t steps) {
  std::array<std::int64_t, 1> const v{steps};
  return ShardEntry::copy("optimizer.steps", 1, 1, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 1}},
                          std::span<std::int64_t const>(v));
}
/// The checkpoint name of a parameter's FP32 main copy (bf16 models).
inline std::string main_param_name(std::string const& param) { return param + ".main_param"; }
/// Where a model of type T finds the FP32 main values of `param`: its main copy when the
/// checkpoint has one (a bf16 checkpoint), else the parameter itself (an FP32 checkpoint).
inline std::string main_source(CheckpointReader const& ckpt, std::string const& param) {
  return ckpt.contains(main_param_name(param)) ? main_param_name(param) : param;
}
inline std::int64_t restore_steps(CheckpointReader const& ckpt) {
  std::array<std::int64_t, 1> steps{0};
  ckpt.fill("optimizer.steps", 1, 1, {{.row0 = 0, .rows = 1, .col0 = 0, .cols = 1}},
            std::span<std::int64_t>(steps));
  return steps[0];
}
}  // namespace detail

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
    if constexpr (has_main_params_v<T>)
      out.push_back(ShardEntry::of<Exec, compute_t<T>>(exec, detail::main_param_name(p.name),
                                                       p.global_rows, p.global_cols, p.blocks,
                                                       opt.main_param(k).view()));
  }
  if (with_steps) out.push_back(detail::steps_entry(opt.steps()));
  return out;
}

/// Loads every parameter's blocks from `ckpt` and nothing else: the optimizer keeps its moments
/// and step count (Megatron's `--finetune` / `--no-load-optim`; a checkpoint converted from
/// Hugging Face holds weights only). A float model takes a bf16 checkpoint's FP32 main copies;
/// a bf16 model's main parameters are set from the loaded values.
/// (`opt`: `AdamW` or `DistributedOptimizer`.)
template <class Opt>
void restore_parameters(CheckpointReader const& ckpt, Opt& opt) {
  using Exec = std::remove_cvref_t<decltype(opt.exec())>;
  using Space = typename Exec::memory_space;
  for (auto* p : opt.params()) {
    using T = std::remove_cvref_t<decltype(*p->value.data())>;
    std::string const src = has_main_params_v<T> ? p->name : detail::main_source(ckpt, p->name);
    ckpt.fill<Exec, T>(opt.exec(), src, p->global_rows, p->global_cols, p->blocks,
                       View<T, Space>(p->value));
  }
  opt.reload_main_params();
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
    if constexpr (has_main_params_v<T>)
      ckpt.fill<Exec, compute_t<T>>(exec, detail::main_source(ckpt, p.name), p.global_rows,
                                    p.global_cols, p.blocks, opt.main_param(k).view());
  }
  opt.set_steps(detail::restore_steps(ckpt));
}

/// The distributed optimizer's entries: the parameters for which `writes(param)` is true, the
/// moments of this rank's shard where it saves them (one optimizer instance, TP-replicated
/// parameters from TP rank 0), and with `with_steps` the step count.
template <class Exec, class T, class C>
std::vector<ShardEntry> training_state_entries(
    DistributedOptimizer<Exec, T, C>& opt,
    std::type_identity_t<std::function<bool(Param<T> const&)>> const& writes, bool with_steps) {
  using Space = typename Exec::memory_space;
  using Moment = typename DistributedOptimizer<Exec, T, C>::Moments::value_type;
  std::vector<ShardEntry> out;
  auto const& exec = opt.exec();
  for (Param<T>* p : opt.params())
    if (writes(*p))
      out.push_back(ShardEntry::of<Exec, T>(exec, p->name, p->global_rows, p->global_cols,
                                            p->blocks, View<T const, Space>(p->value)));
  for (auto& b : opt.buckets())
    for (auto const& s : b.segments) {
      if (!opt.saves(s)) continue;
      Param<T> const& p = *opt.params()[s.param];
      auto const blocks = blocks_of_range(p.blocks, s.param_offset, s.size);
      out.push_back(ShardEntry::of<Exec, Moment>(
          exec, p.name + ".exp_avg", p.global_rows, p.global_cols, blocks,
          View<Moment const, Space>(b.exp_avg.view().cols(s.state_offset, s.size))));
      out.push_back(ShardEntry::of<Exec, Moment>(
          exec, p.name + ".exp_avg_sq", p.global_rows, p.global_cols, blocks,
          View<Moment const, Space>(b.exp_avg_sq.view().cols(s.state_offset, s.size))));
      if constexpr (has_main_params_v<T>)
        out.push_back(ShardEntry::of<Exec, compute_t<T>>(
            exec, detail::main_param_name(p.name), p.global_rows, p.global_cols, blocks,
            View<compute_t<T> const, Space>(b.main.view().cols(s.state_offset, s.size))));
    }
  if (with_steps) out.push_back(detail::steps_entry(opt.steps()));
  return out;
}

/// Loads every parameter's blocks, the moments of this rank's shard and the step count.
template <class Exec, class T, class C>
void restore_training_state(CheckpointReader const& ckpt, DistributedOptimizer<Exec, T, C>& opt) {
  using Moment = typename DistributedOptimizer<Exec, T, C>::Moments::value_type;
  restore_parameters(ckpt, opt);
  auto const& exec = opt.exec();
  for (auto& b : opt.buckets())
    for (auto const& s : b.segments) {
      Param<T> const& p = *opt.params()[s.param];
      auto const blocks = blocks_of_range(p.blocks, s.param_offset, s.size);
      ckpt.fill<Exec, Moment>(exec, p.name + ".exp_avg", p.global_rows, p.global_cols, blocks,
                              b.exp_avg.view().cols(s.state_offset, s.size));
      ckpt.fill<Exec, Moment>(exec, p.name + ".exp_avg_sq", p.global_rows, p.global_cols, blocks,
                              b.exp_avg_sq.view().cols(s.state_offset, s.size));
      if constexpr (has_main_params_v<T>)
        ckpt.fill<Exec, compute_t<T>>(exec, detail::main_source(ckpt, p.name), p.global_rows,
                                      p.global_cols, blocks,
                                      b.main.view().cols(s.state_offset, s.size));
    }
  opt.set_steps(detail::restore_steps(ckpt));
}

}  // namespace v0
}  // namespace moefold
