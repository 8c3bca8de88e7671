// Must not compile: an int is not a Communicator.
#include "moefold/comm/process_groups.hpp"

int main() {
  auto const fold = moefold::FoldedMapping::from({.world = 1});
  moefold::ProcessGroups<int> groups(fold, 0);
  return 0;
}
