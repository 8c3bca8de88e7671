#pragma once
/// \file
/// What CUDA devices this process can use (component `moefold::cuda`). Declarations only: the
/// definitions are compiled by nvcc, so including this header never pulls in CUDA headers.

#include <string>

namespace moefold {
inline namespace v0 {
namespace cuda {

/// Number of CUDA devices this process can use; 0 when there is no device or no driver (on a
/// machine with the toolkit but no GPU, the runtime reports an insufficient driver).
int device_count() noexcept;

/// One line per usable device ("0: NVIDIA H200, sm_90, 139.8 GiB"), or the runtime's reason
/// why there is none.
std::string describe_devices();

/// The CUDA runtime version this library was built against, as major*1000 + minor*10.
int runtime_version() noexcept;

}  // namespace cuda
}  // namespace v0
}  // namespace moefold
