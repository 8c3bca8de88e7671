# Compiles every header under include/moefold/{core,exec,ops} as CUDA with nvcc
# (`nvcc -x cu -std=c++20 -arch=sm_90 -c`, no GPU needed), one translation unit per header,
# and fails listing the headers that do not compile with nvcc's first error lines.
# Variables: NVCC, SOURCE_DIR, BINARY_DIR, CBLAS_DIR, WORK_DIR.
file(GLOB_RECURSE headers RELATIVE ${SOURCE_DIR}/include
     ${SOURCE_DIR}/include/moefold/core/*.hpp
     ${SOURCE_DIR}/include/moefold/exec/*.hpp
     ${SOURCE_DIR}/include/moefold/ops/*.hpp)
list(SORT headers)
file(MAKE_DIRECTORY ${WORK_DIR})
set(failed "")
list(LENGTH headers count)
foreach(header IN LISTS headers)
  string(MAKE_C_IDENTIFIER "${header}" id)
  set(source ${WORK_DIR}/${id}.cu)
  file(WRITE ${source} "#include <${header}>\n#include <${header}>\nint main() { return 0; }\n")
  execute_process(
    COMMAND ${NVCC} -x cu -std=c++20 -arch=sm_90 -Werror all-warnings
            -I${SOURCE_DIR}/include -I${BINARY_DIR}/include -I${CBLAS_DIR}
            -c ${source} -o ${WORK_DIR}/${id}.o
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(SUBSTRING "${out}" 0 1500 head)
    list(APPEND failed "${header}")
    message("nvcc cannot compile ${header}:\n${head}")
  else()
    message("ok  ${header}")
  endif()
endforeach()
if(failed)
  list(LENGTH failed n)
  message(FATAL_ERROR "${n} of ${count} core/exec/ops headers do not compile under nvcc: ${failed}")
endif()
message("all ${count} core/exec/ops headers compile under nvcc -x cu -std=c++20 -arch=sm_90")
