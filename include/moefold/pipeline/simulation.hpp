#pragma once
/// \file
/// `simulate`: runs a schedule's action lists on a logical clock (never wall time) and returns the
/// `PipelineTimeline`: when every computation ran, and each stage's idle time (the bubble).
///
/// The clock: a forward costs `costs.forward` units (1), a backward `costs.backward` (2), sends and
/// receives cost nothing. A stage's communication batch (the actions between two computations,
/// see `PipelineAction`) is posted when the stage reaches it and completes when every receive has
/// its matching send posted — and, with `SendMode::rendezvous`, every send its matching receive
/// posted too (NCCL-like blocking sends). With `SendMode::eager` sends never block (buffered, like
/// an in-process mailbox). A schedule that cannot finish (a deadlock) or whose k-th receive on a
/// channel does not carry the tensor the k-th send sent is reported as an error.

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"
#include "moefold/pipeline/pipeline_action.hpp"
#include "moefold/pipeline/pipeline_schedule.hpp"

namespace moefold {
inline namespace v0 {

/// Logical cost of each computation, in clock units.
struct PipelineCosts {
  int forward = 1;   ///< units per forward of one (microbatch, chunk)
  int backward = 2;  ///< units per backward of one (microbatch, chunk)
};

/// Whether a send waits for its receive to be posted.
enum class SendMode {
  eager,       ///< a send completes when posted (buffered)
  rendezvous,  ///< a send completes when the matching receive is posted
};

/// A computation placed on the clock: it ran during [start, end).
struct TimedAction {
  PipelineAction action;
  int start = 0;
  int end = 0;
};

/// The result of `simulate`: per stage, its computations on the clock, busy and idle time.
struct PipelineTimeline {
  std::vector<std::vector<TimedAction>> stages;  ///< computations of each stage in run order
  std::vector<int> busy;                         ///< computing time of each stage
  std::vector<int> idle;                         ///< makespan − busy, per stage
  int makespan = 0;                              ///< end of the last computation of any stage

  /// Σ idle over the stages.
  int total_idle() const noexcept {
    int s = 0;
    for (int i : idle) s += i;
    return s;
  }
  /// The bubble: total idle / (stages · makespan).
  double idle_fraction() const noexcept {
    if (makespan == 0 || stages.empty()) return 0.0;
    return static_cast<double>(total_idle()) /
           (static_cast<double>(stages.size()) * static_cast<double>(makespan));
  }
};

namespace detail {

/// A posted send or receive on a channel: when, and what tensor (in virtual-stage terms).
struct PostedMessage {
  int time = 0;
  int microbatch = 0;
  int virtual_stage = 0;  ///< the virtual stage that produced the tensor
};

/// One stage's progress through its list.
struct StageCursor {
  std::size_t next = 0;          ///< index of the next action not yet started
  int clock = 0;                 ///< this stage's logical time
  bool in_batch = false;         ///< a communication batch is posted and not yet complete
  std::size_t batch_end = 0;     ///< one past the batch's last action
  std::vector<std::size_t> ops;  ///< per action of the batch: its position on its channel
};

/// Simulates the per-stage action lists `lists` of a pipeline with `chunks` chunks per stage.
inline PipelineTimeline simulate_lists(std::vector<std::vector<PipelineAction>> const& lists,
                                       int chunks, PipelineCosts costs, SendMode mode) {
  int const p = static_cast<int>(lists.size());
  auto vstage = [&](int stage, int chunk) { return chunk * p + stage; };
  // Channel (src, dst, direction): its sends and receives in posting order.
  struct Channel {
    std::vector<PostedMessage> sends, recvs;
  };
  std::vector<Channel> channels(static_cast<std::size_t>(2 * p * p));
  auto channel = [&](int src, int dst, bool forward) -> Channel& {
    return channels[static_cast<std::size_t>(2 * (src * p + dst) + (forward ? 0 : 1))];
  };
  auto channel_of = [&](int stage, PipelineAction const& a) -> Channel& {
    bool const fwd = a.is_forward_direction();
    bool const send = a.op == PipelineOp::send_forward || a.op == PipelineOp::send_backward;
    return send ? channel(stage, a.peer, fwd) : channel(a.peer, stage, fwd);
  };

  PipelineTimeline tl;
  tl.stages.resize(lists.size());
  tl.busy.assign(lists.size(), 0);
  std::vector<StageCursor> cur(lists.size());

  // Advances `stage` as far as it can; returns whether it moved.
  auto advance = [&](int stage) {
    auto const& list = lists[static_cast<std::size_t>(stage)];
    StageCursor& c = cur[static_cast<std::size_t>(stage)];
    bool moved = false;
    while (c.next < list.size()) {
      if (!c.in_batch) {
        PipelineAction const& a = list[c.next];
        if (a.is_compute()) {
          int const cost = a.op == PipelineOp::forward ? costs.forward : costs.backward;
          tl.stages[static_cast<std::size_t>(stage)].push_back({a, c.clock, c.clock + cost});
          tl.busy[static_cast<std::size_t>(stage)] += cost;
          c.clock += cost;
          ++c.next;
          moved = true;
          continue;
        }
        // Post the whole batch: every communication action up to the next computation.
        MOEFOLD_EXPECTS(a.peer >= 0 && a.peer < p, "stage {}: {} has no valid peer", stage,
                        to_string(a, true));
        c.ops.clear();
        c.batch_end = c.next;
        while (c.batch_end < list.size() && !list[c.batch_end].is_compute()) {
          PipelineAction const& b = list[c.batch_end];
          bool const send = b.op == PipelineOp::send_forward || b.op == PipelineOp::send_backward;
          Channel& ch = channel_of(stage, b);
          // A gradient travels backwards, so its tensor comes from the virtual stage after the
          // receiver's; an activation from the one before.
          int const here = vstage(stage, b.chunk);
          int const producer = send ? here : (b.is_forward_direction() ? here - 1 : here + 1);
          auto& q = send ? ch.sends : ch.recvs;
          c.ops.push_back(q.size());
          q.push_back({c.clock, b.microbatch, producer});
          ++c.batch_end;
        }
        c.in_batch = true;
        moved = true;
      }
      // Complete the batch once every partner is posted.
      int done_at = c.clock;
      for (std::size_t i = c.next; i < c.batch_end; ++i) {
        PipelineAction const& b = list[i];
        bool const send = b.op == PipelineOp::send_forward || b.op == PipelineOp::send_backward;
        Channel& ch = channel_of(stage, b);
        std::size_t const pos = c.ops[i - c.next];
        if (send && mode == SendMode::eager) continue;
        auto const& partners = send ? ch.recvs : ch.sends;
        if (partners.size() <= pos) return moved;  // blocked
        done_at = std::max(done_at, partners[pos].time);
      }
      for (std::size_t i = c.next; i < c.batch_end; ++i) {  // what arrived is what was sent?
        PipelineAction const& b = list[i];
        if (b.op != PipelineOp::recv_forward && b.op != PipelineOp::recv_backward) continue;
        Channel& ch = channel_of(stage, b);
        std::size_t const pos = c.ops[i - c.next];
        PostedMessage const& s = ch.sends[pos];
        PostedMessage const& r = ch.recvs[pos];
        if (s.microbatch != r.microbatch || s.virtual_stage != r.virtual_stage)
          throw error(errc::internal,
                      fmt::format("stage {}: {} (receive #{} on its channel) got the tensor of "
                                  "microbatch {} from virtual stage {}",
                                  stage, to_string(b, true), pos, s.microbatch, s.virtual_stage));
      }
      c.clock = done_at;
      c.next = c.batch_end;
      c.in_batch = false;
    }
    return moved;
  };

  for (;;) {
    bool moved = false, finished = true;
    for (int s = 0; s < p; ++s) {
      moved = advance(s) || moved;
      finished = finished &&
                 cur[static_cast<std::size_t>(s)].next == lists[static_cast<std::size_t>(s)].size();
    }
    if (finished) break;
    if (!moved) {
      std::string where;
      for (int s = 0; s < p; ++s) {
        auto const& c = cur[static_cast<std::size_t>(s)];
        if (c.next < lists[static_cast<std::size_t>(s)].size())
          where += fmt::format(" stage {} at {};", s,
                               to_string(lists[static_cast<std::size_t>(s)][c.next], chunks > 1));
      }
      throw error(errc::internal, fmt::format("the pipeline schedule deadlocks:{}", where));
    }
  }
  for (auto const& s : tl.stages)
    if (!s.empty()) tl.makespan = std::max(tl.makespan, s.back().end);
  for (int b : tl.busy) tl.idle.push_back(tl.makespan - b);
  return tl;
}

}  // namespace detail

/// Runs `schedule` on the logical clock. Throws `invalid_config` for an invalid schedule, and
/// `error` (internal) if its action lists deadlock or mismatch under `mode`.
template <PipelineSchedule S>
PipelineTimeline simulate(S const& schedule, PipelineCosts costs = {},
                          SendMode mode = SendMode::eager) {
  schedule.validate();
  std::vector<std::vector<PipelineAction>> lists;
  for (int s = 0; s < schedule.num_stages(); ++s) lists.push_back(schedule.actions(s));
  return detail::simulate_lists(lists, schedule.num_chunks(), costs, mode);
}

}  // namespace v0
}  // namespace moefold
