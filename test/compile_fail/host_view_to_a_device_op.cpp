// Must not compile: a host view passed where a device (CudaSpace) view is required (ViewIn).
#include "moefold/core/view.hpp"

namespace {
struct DeviceLayer {
  void forward(moefold::View<float const, moefold::CudaSpace> x) { (void)x; }
};
}  // namespace

int main() {
  float host[4] = {};
  moefold::View<float const> x(host, 4);
  DeviceLayer layer;
  layer.forward(x);
  return 0;
}
