// Must not compile: `float` is not an expert activation policy (ExpertActivation).
#include "moefold/moe/grouped_gemm_experts.hpp"

int main() {
  moefold::GroupedGemmExperts<moefold::Cpu, float> experts({}, 0);
  return 0;
}
