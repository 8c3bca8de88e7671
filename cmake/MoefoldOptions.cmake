# MOEFOLD_ENABLE_{MPI,CUDA,NCCL}: ON (required), OFF, or AUTO (on when the dependency is found).
# Sets MOEFOLD_HAS_{MPI,CUDA,NCCL} to 1/0 and finds the dependencies of moefold::core.
include_guard(GLOBAL)

function(moefold_tristate name doc)
  set(${name} AUTO CACHE STRING "${doc} (ON, OFF or AUTO)")
  set_property(CACHE ${name} PROPERTY STRINGS ON OFF AUTO)
  string(TOUPPER "${${name}}" value)
  if(value STREQUAL "TRUE" OR value STREQUAL "YES" OR value STREQUAL "1")
    set(value ON)
  elseif(value STREQUAL "FALSE" OR value STREQUAL "NO" OR value STREQUAL "0")
    set(value OFF)
  endif()
  if(NOT value MATCHES "^(ON|OFF|AUTO)$")
    message(FATAL_ERROR "${name} must be ON, OFF or AUTO (got '${${name}}')")
  endif()
  set(${name}_MODE ${value} PARENT_SCOPE)
endfunction()

moefold_tristate(MOEFOLD_ENABLE_MPI "Build the OpenMPI communicator (moefold::mpi)")
moefold_tristate(MOEFOLD_ENABLE_CUDA "Build the CUDA kernels (moefold::cuda)")
moefold_tristate(MOEFOLD_ENABLE_NCCL "Build the NCCL communicator (moefold::nccl)")

# ---- always: the dependencies of moefold::core ----------------------------------------------
find_package(Threads REQUIRED)
find_package(fmt REQUIRED)
include(MoefoldBlas)
# BF16 GEMMs: the BLAS's own cblas_sbgemm where it is exported (a link check: Debian 12's cblas.h
# declares it but its OpenBLAS exports none); otherwise exec/blas.hpp widens blocks to sgemm.
include(CheckSymbolExists)
set(CMAKE_REQUIRED_LIBRARIES ${BLAS_LIBRARIES})
set(CMAKE_REQUIRED_INCLUDES ${MOEFOLD_CBLAS_INCLUDE_DIR})
set(CMAKE_REQUIRED_QUIET ON)
check_symbol_exists(cblas_sbgemm "cblas.h" MOEFOLD_BLAS_EXPORTS_SBGEMM)
unset(CMAKE_REQUIRED_LIBRARIES)
unset(CMAKE_REQUIRED_INCLUDES)
unset(CMAKE_REQUIRED_QUIET)
set(MOEFOLD_HAVE_SBGEMM 0)
if(MOEFOLD_BLAS_EXPORTS_SBGEMM)
  set(MOEFOLD_HAVE_SBGEMM 1)
endif()

# ---- MPI -------------------------------------------------------------------------------------
set(MOEFOLD_HAS_MPI 0)
if(NOT MOEFOLD_ENABLE_MPI_MODE STREQUAL "OFF")
  if(MOEFOLD_ENABLE_MPI_MODE STREQUAL "ON")
    find_package(MPI REQUIRED COMPONENTS CXX)
  else()
    find_package(MPI QUIET COMPONENTS CXX)
  endif()
  if(MPI_CXX_FOUND)
    set(MOEFOLD_HAS_MPI 1)
  endif()
endif()

# ---- CUDA ------------------------------------------------------------------------------------
set(MOEFOLD_HAS_CUDA 0)
if(NOT MOEFOLD_ENABLE_CUDA_MODE STREQUAL "OFF")
  # check_language finds nvcc only through PATH, CUDACXX or CMAKE_CUDA_COMPILER: also look in
  # the toolkit's usual home so that AUTO never silently switches CUDA off.
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    find_program(MOEFOLD_NVCC nvcc HINTS /usr/local/cuda/bin ENV CUDA_HOME PATH_SUFFIXES bin)
    if(MOEFOLD_NVCC)
      set(ENV{CUDACXX} "${MOEFOLD_NVCC}")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90)   # H100/H200; `native` fails where there is no GPU
    endif()
    set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)   # one cudart in a binary
    enable_language(CUDA)
    # CMake 3.25 has no C++20 flag table for nvcc.
    if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    endif()
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    find_package(CUDAToolkit REQUIRED)
    set(MOEFOLD_HAS_CUDA 1)
  elseif(MOEFOLD_ENABLE_CUDA_MODE STREQUAL "ON")
    message(FATAL_ERROR "MOEFOLD_ENABLE_CUDA=ON but no CUDA compiler was found "
                        "(looked on PATH, in CUDACXX and in /usr/local/cuda/bin)")
  endif()
endif()

# ---- NCCL (needs CUDA) -----------------------------------------------------------------------
set(MOEFOLD_HAS_NCCL 0)
if(NOT MOEFOLD_ENABLE_NCCL_MODE STREQUAL "OFF")
  if(MOEFOLD_HAS_CUDA)
    find_package(NCCL)
    if(NCCL_FOUND)
      set(MOEFOLD_HAS_NCCL 1)
    endif()
  endif()
  if(NOT MOEFOLD_HAS_NCCL AND MOEFOLD_ENABLE_NCCL_MODE STREQUAL "ON")
    message(FATAL_ERROR "MOEFOLD_ENABLE_NCCL=ON but NCCL was not found "
                        "(CUDA found: ${MOEFOLD_HAS_CUDA}; set NCCL_ROOT or NCCL_HOME)")
  endif()
endif()

# Compiled component targets, appended to by src/ and cuda/ (for the roll-up target).
set(MOEFOLD_COMPONENT_TARGETS "")
set(MOEFOLD_BUILT_COMPONENTS "")

# MOEFOLD_SANITIZER: build moefold's own tests and tools with sanitizers (thread, address,
# undefined, or address,undefined); the in-process world must be clean under ThreadSanitizer.
# UndefinedBehaviorSanitizer does not recover: the first report ends the program.
set(MOEFOLD_SANITIZER "" CACHE STRING
    "Sanitizer for moefold's tests: thread, address, undefined, address,undefined or empty")
if(MOEFOLD_SANITIZER)
  if(NOT MOEFOLD_SANITIZER MATCHES "^(thread|address|undefined|address,undefined)$")
    message(FATAL_ERROR "MOEFOLD_SANITIZER must be thread, address, undefined or "
                        "address,undefined (got '${MOEFOLD_SANITIZER}')")
  endif()
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${MOEFOLD_SANITIZER}>
                      $<$<COMPILE_LANGUAGE:CXX>:-fno-omit-frame-pointer>)
  if(MOEFOLD_SANITIZER MATCHES "undefined")
    add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fno-sanitize-recover=undefined>)
  endif()
  add_link_options(-fsanitize=${MOEFOLD_SANITIZER})
endif()

# Warnings for moefold's own targets, never forced on consumers.
function(moefold_warnings target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic>)
endfunction()
