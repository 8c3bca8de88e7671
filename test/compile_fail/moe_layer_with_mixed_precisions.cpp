// Must not compile: a double-precision router with float experts.
#include "moefold/comm/inproc/communicator.hpp"
#include "moefold/moe/moe_layer.hpp"

using Layer = moefold::MoELayer<moefold::Cpu, moefold::TopKRouter<moefold::Cpu, moefold::SoftmaxScore, double>,
                                moefold::AllToAllDispatcher<moefold::Dropless>,
                                moefold::GroupedGemmExperts<moefold::Cpu, moefold::SwiGLU>,
                                moefold::inproc::Communicator>;
Layer* layer = nullptr;
int main() { return layer == nullptr ? 0 : 1; }
