# BLAS for moefold::core: OpenBLAS where available (Debian's `libblas` alternative may be the
# slow reference BLAS), with the directory of its cblas.h. Used by the build and by the
# installed package config alike. Defines the target moefold::blas_headers.
include_guard(GLOBAL)
if(NOT DEFINED BLA_VENDOR)
  set(BLA_VENDOR OpenBLAS)
endif()
find_package(BLAS REQUIRED)
find_package(OpenBLAS CONFIG QUIET)   # Debian ships one; it names the matching cblas.h
find_path(MOEFOLD_CBLAS_INCLUDE_DIR cblas.h HINTS ${OpenBLAS_INCLUDE_DIRS} PATH_SUFFIXES openblas)
if(NOT TARGET moefold::blas_headers)
  add_library(moefold::blas_headers INTERFACE IMPORTED)
  if(MOEFOLD_CBLAS_INCLUDE_DIR)
    set_target_properties(moefold::blas_headers PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${MOEFOLD_CBLAS_INCLUDE_DIR}")
  endif()
endif()
