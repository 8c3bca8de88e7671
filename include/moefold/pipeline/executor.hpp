#pragma once
/// \file
/// `run_pipeline`: runs one training step of a pipeline schedule over the `pp` communicator,
/// calling the user's stage model for every forward and backward of (microbatch, chunk) and
/// exchanging activations and their gradients with the neighbouring stages.
///
///   struct MyStage {                                   // a `PipelineStageModel`
///     using value_type = double;                       // float or double
///     std::size_t activation_size() const;             // elements passed between stages
///     void forward(int mb, int chunk, std::span<double const> in, std::span<double> out);
///     void backward(int mb, int chunk, std::span<double const> out_grad,
///                   std::span<double> in_grad);
///   };
///   MyStage stage = ...;                               // the layers of this PP rank's chunks
///   auto r = moefold::run_pipeline(moefold::Interleaved{.stages = 4, .virtual_stages = 2,
///                                                      .microbatches = 8},
///                                  groups.pp(), stage);
///   moefold::all_reduce_tied(groups.embedding(), std::span<double>(stage.tied_grad));
///
/// How the list runs (the contract of `PipelineAction`): computations in list order; the sends
/// and receives between two computations are one `Communicator::exchange` (all sends and
/// receives posted together, then all waited for). The schedules are deadlock-free under that
/// contract even with rendezvous sends, so the executor adds no ordering of its own. Forward
/// traffic uses tag 0, backward traffic tag 1: the k-th send on a (source, destination, tag)
/// channel meets the k-th receive there, which is the order the schedules are built for.

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/comm/communicator.hpp"
#include "moefold/core/bf16.hpp"
#include "moefold/core/error.hpp"
#include "moefold/pipeline/detail/virtual_pipeline.hpp"
#include "moefold/pipeline/pipeline_action.hpp"
#include "moefold/pipeline/pipeline_schedule.hpp"
#include "moefold/pipeline/simulation.hpp"

namespace moefold {
inline namespace v0 {

namespace detail {
template <class M>
struct pipeline_loss {
  using type = typename M::value_type;
};
template <class M>
  requires requires { typename M::loss_type; }
struct pipeline_loss<M> {
  using type = typename M::loss_type;
};
}  // namespace detail
/// The type of a stage model's loss: its `loss_type` (FP32 for a bf16 model, whose losses are
/// computed in FP32), else its `value_type`.
template <class M>
using pipeline_loss_t = typename detail::pipeline_loss<M>::type;

/// The layers one PP rank holds, as the executor sees them. `value_type` is `float`, `double`
/// or `bf16` (activations); a model may name a wider `loss_type` (float or double) for its loss.
/// Every activation passed between virtual stages has `activation_size()` elements (per
/// microbatch; the same at every stage boundary). For chunk `c` of this rank (virtual stage
/// `c·PP + rank`):
///   - `forward(mb, c, input, output)` computes microbatch `mb`. On the first virtual stage
///     `input` is empty (the stage reads microbatch `mb`'s data itself); on the last virtual
///     stage `output` is a span of one `pipeline_loss_t<M>`, which receives the microbatch's
///     loss. Elsewhere both
///     have `activation_size()` elements. The model keeps whatever its backward needs.
///   - `backward(mb, c, output_grad, input_grad)` accumulates the parameter gradients of
///     microbatch `mb` and writes the gradient of its input. On the last virtual stage
///     `output_grad` is the single value 1 (d loss / d loss: scale the loss in `forward` if
///     wanted, e.g. by 1/M); on the first virtual stage `input_grad` is empty.
/// Each (mb, c) has exactly one forward and, later, one backward; backwards of a chunk run in
/// the order of its forwards.
template <class M>
concept PipelineStageModel = requires(M& m, int mb, int chunk,
                                      std::span<typename M::value_type const> in,
                                      std::span<typename M::value_type> out,
                                      std::span<pipeline_loss_t<M>> loss) {
  requires std::same_as<typename M::value_type, float> ||
      std::same_as<typename M::value_type, double> || std::same_as<typename M::value_type, bf16>;
  requires std::same_as<pipeline_loss_t<M>, float> || std::same_as<pipeline_loss_t<M>, double>;
  { m.activation_size() } -> std::convertible_to<std::size_t>;
  m.forward(mb, chunk, in, out);
  m.forward(mb, chunk, in, loss);
  m.backward(mb, chunk, in, out);
};

/// Options of `run_pipeline`.
struct PipelineExecutorOptions {
  /// Measure the bubble on a logical clock advanced by the real messages: every message carries
  /// a header (the sender's logical time, the microbatch, the virtual stage that produced it)
  /// as a second small message; a computation costs `costs` units; a communication batch ends
  /// at max(own time, the senders' times of its receives) — eager sends, as in `simulate(…,
  /// SendMode::eager)`. The receiver also checks each header against the tensor its action
  /// expects. At the end of the step, two all-reduces over `pp` give the pipeline's makespan
  /// and idle time. Off: activations travel alone and the step ends without a collective.
  bool logical_clock = false;
  PipelineCosts costs{};  ///< logical cost of a forward and of a backward (1 and 2)
};

/// What one step of `run_pipeline` returns on one PP rank.
template <class T>
struct PipelineStepResult {
  /// Σ of the microbatch losses, on the rank holding the last virtual stage; 0 elsewhere.
  T loss{};
  /// With `logical_clock`: this stage's computations on the logical clock, in run order (the
  /// same form as `PipelineTimeline::stages[rank]`). Empty otherwise; so are the numbers below.
  std::vector<TimedAction> computations;
  int stages = 0;      ///< PP
  int busy = 0;        ///< this stage's computing time
  int makespan = 0;    ///< end of the last computation of any stage (same on every rank)
  int total_idle = 0;  ///< Σ over the stages of makespan − busy (same on every rank)

  /// This stage's idle time, makespan − busy.
  int idle() const noexcept { return makespan - busy; }
  /// The bubble: total idle / (PP · makespan), the pipeline's idle fraction (same on every rank).
  double idle_fraction() const noexcept {
    if (makespan == 0 || stages == 0) return 0.0;
    return static_cast<double>(total_idle) /
           (static_cast<double>(stages) * static_cast<double>(makespan));
  }
};

namespace detail {

inline constexpr int kForwardTag = 0;       ///< activations
inline constexpr int kBackwardTag = 1;      ///< activation gradients
inline constexpr int kHeaderTagOffset = 2;  ///< a header travels on its tensor's tag + 2

/// The header of a message under the logical clock: sender's time, microbatch, virtual stage.
using MessageHeader = std::array<std::int64_t, 3>;

constexpr bool is_send(PipelineOp op) noexcept {
  return op == PipelineOp::send_forward || op == PipelineOp::send_backward;
}

/// One stage's tensors in flight, keyed by (microbatch, chunk): received and not yet consumed,
/// or produced and not yet sent.
template <class T>
class StageBuffers {
 public:
  using Key = std::pair<int, int>;

  /// Takes the tensor stored under `a`'s (microbatch, chunk) in `which`.
  std::vector<T> take(std::map<Key, std::vector<T>>& which, PipelineAction const& a, int stage,
                      char const* missing) {
    auto it = which.find({a.microbatch, a.chunk});
    if (it == which.end())
      throw error(errc::internal,
                  fmt::format("pipeline stage {}: {} {}", stage, to_string(a, true), missing));
    std::vector<T> out = std::move(it->second);
    which.erase(it);
    return out;
  }
  /// A new tensor of `n` elements under `a`'s (microbatch, chunk) in `which`.
  std::vector<T>& make(std::map<Key, std::vector<T>>& which, PipelineAction const& a, int stage,
                       std::size_t n) {
    auto [it, fresh] = which.try_emplace({a.microbatch, a.chunk}, n);
    if (!fresh)
      throw error(errc::internal,
                  fmt::format("pipeline stage {}: {} would overwrite a tensor not yet used", stage,
                              to_string(a, true)));
    return it->second;
  }
  /// Throws unless every buffer was used.
  void expect_empty(int stage) const {
    std::size_t const left =
        inputs.size() + outputs.size() + output_grads.size() + input_grads.size();
    if (left != 0)
      throw error(errc::internal,
                  fmt::format("pipeline stage {}: the step ended with {} received or produced "
                              "tensors unused ({} inputs, {} outputs, {} output gradients, {} "
                              "input gradients)",
                              stage, left, inputs.size(), outputs.size(), output_grads.size(),
                              input_grads.size()));
  }

  std::map<Key, std::vector<T>> inputs;        ///< received activations (recv_forward)
  std::map<Key, std::vector<T>> outputs;       ///< forward outputs to send (send_forward)
  std::map<Key, std::vector<T>> output_grads;  ///< received gradients (recv_backward)
  std::map<Key, std::vector<T>> input_grads;   ///< backward results to send (send_backward)
};

}  // namespace detail

/// Runs `schedule`'s action list for this rank (`pp.rank()` is the stage) with `model`: one
/// training step of `num_microbatches()` microbatches. Returns the loss sum (last stage) and,
/// with `options.logical_clock`, the bubble measured on the logical clock.
///
/// Collective over `pp`: every rank of the group must call it with the same schedule and
/// options; `pp.size()` must equal the schedule's PP. Throws `invalid_config` for an invalid
/// schedule or a mismatched group, and rethrows whatever the model throws: under
/// `inproc::run` that fails the world, so the other stages' pending receives fail at once
/// (`errc::aborted`, "… because rank R failed: <what>"), and a stage that has returned from its
/// rank function fails the receives waiting for it, naming it; under `mpi::run` the failing
/// rank prints "moefold: rank R failed: <what>" and aborts the job. A stage that stalls fails
/// its neighbours' receives after the communicator's timeout, naming the peer they wait for.
/// Tied weights are not reduced here: call `all_reduce_tied` after the step.
template <PipelineSchedule S, Communicator Comm, PipelineStageModel Model>
PipelineStepResult<pipeline_loss_t<Model>> run_pipeline(
    S const& schedule, Comm& pp, Model& model, PipelineExecutorOptions const& options = {}) {
  using T = typename Model::value_type;
  using L = pipeline_loss_t<Model>;
  schedule.validate();
  MOEFOLD_EXPECTS(pp.valid(), "run_pipeline needs a valid pp communicator");
  if (pp.size() != schedule.num_stages())
    throw invalid_config(
        fmt::format("the pp group has {} ranks but the schedule has PP = {} stages", pp.size(),
                    schedule.num_stages()));
  std::size_t const n = model.activation_size();
  MOEFOLD_EXPECTS(n >= 1, "the stage model's activation_size() must be at least 1 (got {})", n);

  int const stage = pp.rank();
  detail::VirtualPipeline const vp{schedule.num_stages(), schedule.num_chunks()};
  std::vector<PipelineAction> const actions = schedule.actions(stage);
  detail::StageBuffers<T> buf;
  PipelineStepResult<L> result;
  result.stages = schedule.num_stages();
  bool const clocked = options.logical_clock;
  std::int64_t clock = 0;

  auto compute = [&](PipelineAction const& a) {
    bool const first = vp.is_first(stage, a.chunk), last = vp.is_last(stage, a.chunk);
    if (a.op == PipelineOp::forward) {
      std::vector<T> const input =
          first ? std::vector<T>{} : buf.take(buf.inputs, a, stage, "has no received input");
      if (last) {
        L loss[1] = {L(0)};
        model.forward(a.microbatch, a.chunk, std::span<T const>(input), std::span<L>(loss));
        result.loss += loss[0];
      } else {
        model.forward(a.microbatch, a.chunk, std::span<T const>(input),
                      std::span<T>(buf.make(buf.outputs, a, stage, n)));
      }
    } else {
      std::vector<T> const grad =
          last ? std::vector<T>{T(1)}
               : buf.take(buf.output_grads, a, stage, "has no received output gradient");
      std::span<T> input_grad;
      if (!first) input_grad = buf.make(buf.input_grads, a, stage, n);
      model.backward(a.microbatch, a.chunk, std::span<T const>(grad), input_grad);
    }
    if (clocked) {
      int const cost = a.op == PipelineOp::forward ? options.costs.forward : options.costs.backward;
      int const start = static_cast<int>(clock);
      result.computations.push_back({a, start, start + cost});
      result.busy += cost;
      clock += cost;
    }
  };

  // One batch: actions[begin, end), all sends and receives. Sends are posted first.
  std::vector<P2POp> ops;
  std::vector<detail::MessageHeader> headers;
  auto communicate = [&](std::size_t begin, std::size_t end) {
    ops.clear();
    headers.assign(end - begin, detail::MessageHeader{});  // stable: no push_back below
    for (int pass = 0; pass < 2; ++pass) {
      bool const sends = pass == 0;
      for (std::size_t i = begin; i < end; ++i) {
        PipelineAction const& a = actions[i];
        if (detail::is_send(a.op) != sends) continue;
        bool const fwd = a.is_forward_direction();
        int const tag = fwd ? detail::kForwardTag : detail::kBackwardTag;
        detail::MessageHeader& h = headers[i - begin];
        if (sends) {
          auto& from = fwd ? buf.outputs : buf.input_grads;
          auto it = from.find({a.microbatch, a.chunk});
          if (it == from.end())
            throw error(errc::internal, fmt::format("pipeline stage {}: {} before its tensor was "
                                                    "computed",
                                                    stage, to_string(a, true)));
          ops.push_back(P2POp::send(std::span<T const>(it->second), a.peer, tag));
          h = {clock, a.microbatch, vp.virtual_stage(stage, a.chunk)};
          if (clocked)
            ops.push_back(P2POp::send(std::span<std::int64_t const>(h), a.peer,
                                      tag + detail::kHeaderTagOffset));
        } else {
          auto& into = fwd ? buf.inputs : buf.output_grads;
          ops.push_back(P2POp::recv(std::span<T>(buf.make(into, a, stage, n)), a.peer, tag));
          if (clocked)
            ops.push_back(
                P2POp::recv(std::span<std::int64_t>(h), a.peer, tag + detail::kHeaderTagOffset));
        }
      }
    }
    pp.exchange(std::span<P2POp const>(ops));
    std::int64_t done = clock;
    for (std::size_t i = begin; i < end; ++i) {
      PipelineAction const& a = actions[i];
      bool const fwd = a.is_forward_direction();
      if (detail::is_send(a.op)) {
        (fwd ? buf.outputs : buf.input_grads).erase({a.microbatch, a.chunk});
        continue;
      }
      if (!clocked) continue;
      // A gradient comes from the virtual stage after this one, an activation from the one
      // before: the header tells whether the k-th message on the channel is the one expected.
      detail::MessageHeader const& h = headers[i - begin];
      int const here = vp.virtual_stage(stage, a.chunk);
      int const producer = fwd ? here - 1 : here + 1;
      if (h[1] != a.microbatch || h[2] != producer)
        throw error(errc::internal,
                    fmt::format("pipeline stage {}: {} got the tensor of microbatch {} from "
                                "virtual stage {} (expected microbatch {} from virtual stage {})",
                                stage, to_string(a, true), h[1], h[2], a.microbatch, producer));
      done = std::max(done, h[0]);
    }
    clock = done;
  };

  for (std::size_t i = 0; i < actions.size();) {
    if (actions[i].is_compute()) {
      compute(actions[i]);
      ++i;
      continue;
    }
    std::size_t end = i;
    while (end < actions.size() && !actions[end].is_compute()) ++end;
    communicate(i, end);
    i = end;
  }
  buf.expect_empty(stage);

  if (clocked) {
    std::int64_t span_end = result.computations.empty() ? 0 : result.computations.back().end;
    std::int64_t busy_sum = result.busy;
    pp.all_reduce(std::span<std::int64_t>(&span_end, 1), ReduceOp::max);
    pp.all_reduce(std::span<std::int64_t>(&busy_sum, 1), ReduceOp::sum);
    result.makespan = static_cast<int>(span_end);
    result.total_idle = static_cast<int>(result.stages * span_end - busy_sum);
  }
  return result;
}

/// Sums the gradient of a weight tied between the first and the last pipeline stage (the word
/// embedding and the output layer) over the `embedding` group, so that both copies hold the
/// full gradient — Megatron's `finalize_model_grads` step 3 (spec §4.3). A rank outside the
/// group (a null communicator, e.g. a middle stage) does nothing; with one stage the group has
/// one rank and the sum is the gradient itself.
/// Collective over `embedding`: every member must call it with the same count.
template <Communicator Comm, CommScalar T>
void all_reduce_tied(Comm& embedding, std::span<T> grad) {
  if (!embedding.valid()) return;
  embedding.all_reduce(grad, ReduceOp::sum);
}

}  // namespace v0
}  // namespace moefold
