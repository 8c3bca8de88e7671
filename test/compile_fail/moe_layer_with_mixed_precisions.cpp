// Must not compile: a float router with double experts (a router computes in the experts'
// compute type or in double, never narrower).
#include "moefold/comm/inproc/communicator.hpp"
#include "moefold/moe/moe_layer.hpp"

using Layer = moefold::MoELayer<moefold::Cpu, moefold::TopKRouter<moefold::Cpu, moefold::SoftmaxScore, float>,
                                moefold::AllToAllDispatcher<moefold::Dropless>,
                                moefold::GroupedGemmExperts<moefold::Cpu, moefold::SwiGLU,
                                                            moefold::BlasGroupedGemm, double>,
                                moefold::inproc::Communicator>;
Layer* layer = nullptr;
int main() { return layer == nullptr ? 0 : 1; }
