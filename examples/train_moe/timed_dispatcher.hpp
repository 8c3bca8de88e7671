#pragma once
// A dispatcher policy that times another (for the summary's dispatch and combine phases): the
// MoE layer's dispatcher slot takes it like AllToAllDispatcher<Dropless>.

#include <span>
#include <utility>
#include <vector>

#include "moefold/moe/token_dispatcher.hpp"
#include "phase_times.hpp"

namespace moefold::train_demo {

template <class Policy>
struct TimedDispatcher {
  using drop_policy = typename Policy::drop_policy;

  template <class Exec, class Comm, class Real>
  class dispatcher {
   public:
    using real_type = Real;
    using exec_type = Exec;
    using Inner = typename Policy::template dispatcher<Exec, Comm, Real>;
    using In = View<Real const, typename Exec::memory_space>;

    template <class... Args>
    explicit dispatcher(Args&&... args) : inner_(std::forward<Args>(args)...) {}

    DispatchMetadata const& plan(Routing<Real> const& r) {
      return timed(
          phase_times().dispatch, [&]() -> auto const& { return inner_.plan(r); });
    }
    DispatchOutput<Real, typename Exec::memory_space> dispatch(In x, In probs) {
      return timed(phase_times().dispatch, [&] { return inner_.dispatch(x, probs); });
    }
    Buffer<Real, typename Exec::memory_space> combine(In y) {
      return timed(phase_times().combine, [&] { return inner_.combine(y); });
    }
    CombineGrad<Real, typename Exec::memory_space> combine_backward(In dy) {
      return timed(phase_times().combine, [&] { return inner_.combine_backward(dy); });
    }
    DispatchGrad<Real, typename Exec::memory_space> dispatch_backward(In dx, In dprobs) {
      return timed(phase_times().dispatch, [&] { return inner_.dispatch_backward(dx, dprobs); });
    }
    /// The all-to-all dispatcher's overlap and buffer reuse (moe/all_to_all_dispatcher.hpp),
    /// forwarded; the overlapped work's time is not counted as dispatch or combine.
    static constexpr bool overlaps_work = requires { requires Inner::overlaps_work; };
    template <class Work>
    DispatchOutput<Real, typename Exec::memory_space> dispatch(In x, In probs, Work&& work) {
      double other = 0;
      auto out = timed(phase_times().dispatch,
                       [&] { return inner_.dispatch(x, probs, untimed(other, work)); });
      phase_times().dispatch -= other;
      return out;
    }
    template <class Work = moefold::detail::NoWork>
    Buffer<Real, typename Exec::memory_space> combine_owned(
        Buffer<Real, typename Exec::memory_space>&& y, Work&& work = {}) {
      if constexpr (std::is_same_v<std::remove_cvref_t<Work>, moefold::detail::NoWork>)
        return timed(phase_times().combine, [&] { return inner_.combine_owned(std::move(y)); });
      double other = 0;
      auto out = timed(phase_times().combine,
                       [&] { return inner_.combine_owned(std::move(y), untimed(other, work)); });
      phase_times().combine -= other;
      return out;
    }
    void give_back(Buffer<Real, typename Exec::memory_space>&& b) { inner_.give_back(std::move(b)); }
    DispatchMetadata const& metadata() const { return inner_.metadata(); }
    void stash(int mb) { inner_.stash(mb); }
    void restore(int mb) { inner_.restore(mb); }
    void drop_stashed() { inner_.drop_stashed(); }

   private:
    /// `work` timed into `seconds`.
    template <class Work>
    static auto untimed(double& seconds, Work& work) {
      return [&seconds, &work] {
        Stopwatch w;
        work();
        seconds += w.seconds();
      };
    }
    template <class F>
    static decltype(auto) timed(double& into, F&& f) {
      Stopwatch w;
      decltype(auto) r = f();
      into += w.seconds();
      return r;
    }
    Inner inner_;
  };
};

}  // namespace moefold::train_demo
