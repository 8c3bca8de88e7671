// The NCCL component links, and the library loaded at run time is the one compiled against
// (ncclGetVersion needs no GPU).
#include <cstdio>

#include "moefold/comm/nccl_info.hpp"

int main() {
  int const loaded = moefold::nccl::runtime_version();
  int const compiled = moefold::nccl::compiled_version();
  std::printf("NCCL compiled %s, loaded %s\n", moefold::nccl::version_string(compiled).c_str(),
              moefold::nccl::version_string(loaded).c_str());
  // Same major.minor; a newer patch at run time is fine.
  return loaded / 100 == compiled / 100 && loaded >= compiled ? 0 : 1;
}
