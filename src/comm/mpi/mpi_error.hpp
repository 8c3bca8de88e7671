#pragma once
// MPI return codes turned into moefold::error with MPI's own message.

#include <mpi.h>

#include <string>
#include <string_view>
#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi::detail {

/// MPI's text for an error code, e.g. "MPI_ERR_TRUNCATE: message truncated".
inline std::string error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  return std::string(text, static_cast<std::size_t>(len));
}

inline void check(int code, std::string_view call) {
  if (code == MPI_SUCCESS) return;
  throw error(errc::communication,
              fmt::format("{} failed: {} (MPI error {})", call, error_text(code), code));
}

}  // namespace mpi::detail
}  // namespace v0
}  // namespace moefold
