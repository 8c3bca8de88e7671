#pragma once
// The execution instance the tests run their layers on: `Cpu`, or `ShuffledCpu` when the build
// sets MOEFOLD_TEST_EXECUTION=ShuffledCpu (scripts/test.sh's sanitizer phase does), so that the
// whole suite also checks that no op body depends on the order its indices run in.

#include "moefold/exec/cpu.hpp"
#include "moefold/exec/shuffled_cpu.hpp"

#ifndef MOEFOLD_TEST_EXEC
#define MOEFOLD_TEST_EXEC ::moefold::Cpu
#endif

namespace moefold::test {
using Exec = MOEFOLD_TEST_EXEC;
}  // namespace moefold::test
