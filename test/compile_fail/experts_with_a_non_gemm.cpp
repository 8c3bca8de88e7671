// Must not compile: SwiGLU is an activation, not a grouped GEMM policy (GroupedGemmPolicy).
#include "moefold/moe/grouped_gemm_experts.hpp"

int main() {
  moefold::GroupedGemmExperts<moefold::Cpu, moefold::SwiGLU, moefold::SwiGLU> experts({}, 0);
  return 0;
}
