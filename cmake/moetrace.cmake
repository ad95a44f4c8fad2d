# Shared build settings and the one-target-per-folder helper.

set(MOETRACE_WARNINGS -Wall -Wextra -Wpedantic -Wno-unused-parameter)
if(MOETRACE_WERROR)
  list(APPEND MOETRACE_WARNINGS -Werror)
endif()
if(MOETRACE_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  add_link_options(-fsanitize=address,undefined)
endif()
if(MOETRACE_FUZZ)
  # Coverage and sanitizers in every library the fuzz targets link, not only in the targets.
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined)
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

# CUDA backend (src/kernels/cuda, src/model/cuda). MOETRACE_CUDA=ON requires nvcc, AUTO uses it when
# found, OFF skips it. Sets MOETRACE_WITH_CUDA. Code for sm_90 (H100/H200) plus compute_90 PTX so
# that newer GPUs can JIT it. Override with -DCMAKE_CUDA_ARCHITECTURES=...
macro(moetrace_enable_cuda)
  set(MOETRACE_WITH_CUDA OFF)
  if(NOT MOETRACE_CUDA STREQUAL "OFF")
    if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS /usr/local/cuda/bin/nvcc)
      set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
    endif()
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
        set(CMAKE_CUDA_ARCHITECTURES 90-real 90-virtual)
      endif()
      enable_language(CUDA)
      set(CMAKE_CUDA_STANDARD 17)  # .cu files need no C++20; CMake 3.25 knows no CUDA20 for nvcc
      set(CMAKE_CUDA_STANDARD_REQUIRED ON)
      find_package(CUDAToolkit REQUIRED)
      set(MOETRACE_WITH_CUDA ON)
      message(STATUS "moetrace: CUDA backend ON (${CMAKE_CUDA_COMPILER}, archs ${CMAKE_CUDA_ARCHITECTURES})")
    elseif(MOETRACE_CUDA STREQUAL "ON")
      message(FATAL_ERROR "MOETRACE_CUDA=ON but no CUDA compiler (nvcc) was found; set CMAKE_CUDA_COMPILER")
    else()
      message(STATUS "moetrace: CUDA backend OFF (no nvcc found)")
    endif()
  endif()
endmacro()

# Flags for .cu files of moetrace targets: host warnings through nvcc, fast math off (routing is
# tie-sensitive), line info for Nsight Compute.
set(MOETRACE_CUDA_FLAGS -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter --expt-relaxed-constexpr -lineinfo)
