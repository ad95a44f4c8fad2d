# Shared build settings and the one-target-per-folder helper.

set(MOETRACE_WARNINGS -Wall -Wextra -Wpedantic -Wno-unused-parameter)
if(MOETRACE_WERROR)
  list(APPEND MOETRACE_WARNINGS -Werror)
endif()
if(MOETRACE_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()
if(CMAKE_BUILD_TYPE STREQUAL "Release" AND NOT MOETRACE_SANITIZE)
  add_compile_options(-march=x86-64-v3 -mtune=native)
endif()

# moetrace_library(<name> DEPS <targets...>): a static library from every .cc in the current folder,
# exposing ${PROJECT_SOURCE_DIR}/src (so includes read "core/tensor.h") and include/.
function(moetrace_library name)
  cmake_parse_arguments(ARG "" "" "DEPS;SOURCES" ${ARGN})
  if(ARG_SOURCES)
    set(srcs ${ARG_SOURCES})
  else()
    file(GLOB srcs CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cc)
  endif()
  add_library(${name} STATIC ${srcs})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/include)
  target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${MOETRACE_WARNINGS}>)
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  set_target_properties(${name} PROPERTIES POSITION_INDEPENDENT_CODE ON)
endfunction()

# BLAS: the OpenMP build of OpenBLAS (it runs single-threaded inside our own parallel regions),
# else any CBLAS CMake finds.
function(moetrace_find_blas)
  find_library(MOETRACE_OPENBLAS_OMP openblas
    PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp /usr/lib/aarch64-linux-gnu/openblas-openmp
    NO_DEFAULT_PATH)
  find_path(MOETRACE_CBLAS_INCLUDE cblas.h PATHS /usr/include/x86_64-linux-gnu/openblas-openmp
    /usr/include/aarch64-linux-gnu/openblas-openmp /usr/include/x86_64-linux-gnu /usr/include)
  if(MOETRACE_OPENBLAS_OMP)
    add_library(moetrace_blas INTERFACE)
    target_link_libraries(moetrace_blas INTERFACE ${MOETRACE_OPENBLAS_OMP})
    target_include_directories(moetrace_blas INTERFACE ${MOETRACE_CBLAS_INCLUDE})
    message(STATUS "moetrace: BLAS = ${MOETRACE_OPENBLAS_OMP}")
  else()
    set(BLA_VENDOR OpenBLAS)
    find_package(BLAS REQUIRED)
    add_library(moetrace_blas INTERFACE)
    target_link_libraries(moetrace_blas INTERFACE BLAS::BLAS)
    target_include_directories(moetrace_blas INTERFACE ${MOETRACE_CBLAS_INCLUDE})
    message(STATUS "moetrace: BLAS = ${BLAS_LIBRARIES}")
  endif()
endfunction()
