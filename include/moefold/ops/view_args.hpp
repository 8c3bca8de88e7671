#pragma once
/// \file
/// The view types of the nn ops' launchers: `ops::InView<Exec, T>` (read-only elements of the
/// instance's space, not deduced: a `View<T>`, a host vector or a Buffer converts to it) and
/// `ops::OutView<Exec, T>` (written elements; T is deduced from it).
///
///   template <class Exec, class T>
///   void f(Exec const& exec, ops::InView<Exec, T> x, ops::OutView<Exec, T> y);

#include <type_traits>

#include "moefold/core/view.hpp"

namespace moefold {
inline namespace v0 {
namespace ops {

template <class Exec, class T>
using InView = std::type_identity_t<View<T const, typename Exec::memory_space>>;
template <class Exec, class T>
using OutView = View<T, typename Exec::memory_space>;

}  // namespace ops
}  // namespace v0
}  // namespace moefold
