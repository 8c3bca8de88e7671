#pragma once
/// \file
/// Errors thrown by moefold: one exception type with a category, and `invalid_config` for a
/// folding or layer configuration that breaks a rule. Every message names the rule and the
/// numbers involved.

#include <stdexcept>
#include <string>
#include <string_view>

#include "moefold/config.hpp"
#include "moefold/core/format.hpp"

namespace moefold {
inline namespace v0 {

/// What kind of failure an `error` reports.
enum class errc {
  invalid_config,    ///< a parallel mapping or layer configuration breaks a rule
  invalid_argument,  ///< a precondition of a call does not hold
  aborted,           ///< another rank failed; this rank's collective was abandoned
  timeout,           ///< a collective did not complete before its deadline
  communication,     ///< the communication backend reported a failure
  unavailable,       ///< a backend or device is not available in this build or machine
  internal,          ///< a broken invariant inside moefold (a bug)
};

/// The category's name, as printed in messages.
constexpr std::string_view to_string(errc c) noexcept {
  switch (c) {
    case errc::invalid_config: return "invalid_config";
    case errc::invalid_argument: return "invalid_argument";
    case errc::aborted: return "aborted";
    case errc::timeout: return "timeout";
    case errc::communication: return "communication";
    case errc::unavailable: return "unavailable";
    case errc::internal: return "internal";
  }
  return "unknown";
}

/// The exception type of moefold. `what()` is the message alone; `category()` tells the kind.
class error : public std::runtime_error {
 public:
  error(errc category, std::string const& message)
      : std::runtime_error(message), category_(category) {}
  errc category() const noexcept { return category_; }

 private:
  errc category_;
};

/// A parallel mapping or layer configuration that breaks a rule. The message names the rule and
/// the numbers, e.g. "world_size (12) is not divisible by model_size TP·PP·CP = 8".
class invalid_config : public error {
 public:
  explicit invalid_config(std::string const& message) : error(errc::invalid_config, message) {}
};

namespace detail {
[[noreturn]] inline void throw_precondition(char const* condition, char const* file, int line,
                                            std::string const& message) {
  throw error(errc::invalid_argument,
              message + " (precondition `" + condition + "` failed at " + file + ":" +
                  std::to_string(line) + ")");
}
}  // namespace detail

}  // namespace v0
}  // namespace moefold

/// Checks a precondition of a public call; on failure throws `moefold::error` (invalid_argument)
/// with the message (`{}` placeholders, core/format.hpp: no fmt, so the macro works in CUDA
/// translation units), the condition and the place. Usage:
/// `MOEFOLD_EXPECTS(n >= 0, "count {} must not be negative", n);`
#define MOEFOLD_EXPECTS(condition, ...)                                                          \
  do {                                                                                           \
    if (!(condition)) {                                                                          \
      ::moefold::detail::throw_precondition(#condition, __FILE__, __LINE__,                      \
                                            ::moefold::detail::format_message(__VA_ARGS__));                         \
    }                                                                                            \
  } while (false)
