# Install rules, the installed package config and the build-tree export.
include_guard(GLOBAL)
if(NOT MOEFOLD_INSTALL)
  return()   # a subproject (add_subdirectory) uses the targets directly
endif()
set(MOEFOLD_CONFIG_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/moefold)

install(TARGETS moefold_core EXPORT moefold-core-targets)
foreach(comp IN LISTS MOEFOLD_BUILT_COMPONENTS)
  install(TARGETS moefold_${comp} EXPORT moefold-${comp}-targets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
endforeach()
write_basic_package_version_file(${PROJECT_BINARY_DIR}/moefoldConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)

# Build-tree package: find_package(moefold) with moefold_DIR=<build dir>.
foreach(comp IN ITEMS core LISTS MOEFOLD_BUILT_COMPONENTS)
  export(EXPORT moefold-${comp}-targets NAMESPACE moefold::
         FILE ${PROJECT_BINARY_DIR}/moefold-${comp}-targets.cmake)
endforeach()
configure_package_config_file(cmake/moefoldConfig.cmake.in ${PROJECT_BINARY_DIR}/moefoldConfig.cmake
  INSTALL_DESTINATION . INSTALL_PREFIX ${PROJECT_BINARY_DIR})
configure_file(cmake/MoefoldBlas.cmake ${PROJECT_BINARY_DIR}/MoefoldBlas.cmake COPYONLY)
configure_file(cmake/FindNCCL.cmake ${PROJECT_BINARY_DIR}/FindNCCL.cmake COPYONLY)

# Installed package.
install(DIRECTORY include/moefold DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_BINARY_DIR}/include/moefold/config.hpp
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/moefold)
foreach(comp IN ITEMS core LISTS MOEFOLD_BUILT_COMPONENTS)
  install(EXPORT moefold-${comp}-targets NAMESPACE moefold:: DESTINATION ${MOEFOLD_CONFIG_DIR})
endforeach()
configure_package_config_file(cmake/moefoldConfig.cmake.in
  ${PROJECT_BINARY_DIR}/install/moefoldConfig.cmake INSTALL_DESTINATION ${MOEFOLD_CONFIG_DIR})
install(FILES ${PROJECT_BINARY_DIR}/install/moefoldConfig.cmake
              ${PROJECT_BINARY_DIR}/moefoldConfigVersion.cmake
              cmake/MoefoldBlas.cmake cmake/FindNCCL.cmake
        DESTINATION ${MOEFOLD_CONFIG_DIR})
