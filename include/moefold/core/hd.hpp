#pragma once
/// \file
/// `MOEFOLD_HD` marks a function that runs on the host and, compiled by nvcc, on the device:
/// the ops tier's bodies (include/moefold/ops/) and the views' accessors carry it. Host-only
/// compilers see nothing. `MOEFOLD_RESTRICT` is the compilers' `__restrict__`.

#if defined(__CUDACC__)
#define MOEFOLD_HD __host__ __device__
#else
#define MOEFOLD_HD
#endif

#define MOEFOLD_RESTRICT __restrict__
