#include "moefold/comm/nccl_info.hpp"

#include <nccl.h>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

namespace moefold {
inline namespace v0 {
namespace nccl {

int runtime_version() {
  int version = 0;
  ncclResult_t const r = ncclGetVersion(&version);
  if (r != ncclSuccess) {
    throw error(errc::unavailable, fmt::format("ncclGetVersion failed: {}", ncclGetErrorString(r)));
  }
  return version;
}

int compiled_version() noexcept { return NCCL_VERSION_CODE; }

std::string version_string(int code) {
  return fmt::format("{}.{}.{}", code / 10000, (code / 100) % 100, code % 100);
}

}  // namespace nccl
}  // namespace v0
}  // namespace moefold
