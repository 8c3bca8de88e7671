#pragma once
// MPI return codes turned into moefold::error with MPI's own message.

#include <mpi.h>

#include <string_view>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace mpi::detail {

inline void check(int code, std::string_view call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) len = 0;
  throw error(errc::communication,
              fmt::format("{} failed: {} (MPI error {})", call, std::string_view(text, len), code));
}

}  // namespace mpi::detail
}  // namespace v0
}  // namespace moefold
