#pragma once
// The message of the exception a call throws, for tests of error messages.

#include <exception>
#include <string>

namespace moefold::test {

/// The `what()` of the exception that `fn` throws, or "no error".
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (std::exception const& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace moefold::test
