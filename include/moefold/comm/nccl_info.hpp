#pragma once
/// \file
/// Facts about the NCCL library this build links (component `moefold::nccl`). Declarations
/// only: NCCL and CUDA headers stay out of public headers.

#include <string>

namespace moefold {
inline namespace v0 {
namespace nccl {

/// The version of the NCCL library loaded at run time, as NCCL encodes it
/// (major*10000 + minor*100 + patch); works without a GPU.
int runtime_version();

/// The version of the NCCL headers moefold was compiled against, same encoding.
int compiled_version() noexcept;

/// "2.28.9" for a version code.
std::string version_string(int code);

}  // namespace nccl
}  // namespace v0
}  // namespace moefold
