# flashcpu_bench_support: the code bench/ and tools/ share (problem setup, FLOP
# formulas, the materialized OpenBLAS baseline, peak-memory measurement, FMA and
# bandwidth probes). Included by bench/CMakeLists.txt and tools/CMakeLists.txt;
# include_guard makes the first include define it, so tools build with
# FLASHCPU_BUILD_BENCH=OFF too, and nothing is compiled twice. No Google Benchmark
# dependency: the tools do not need it.
include_guard(GLOBAL)

add_library(flashcpu_bench_support STATIC
  ${CMAKE_CURRENT_LIST_DIR}/support.cpp
  ${CMAKE_CURRENT_LIST_DIR}/backward.cpp
  ${CMAKE_CURRENT_LIST_DIR}/machine.cpp
  ${CMAKE_CURRENT_LIST_DIR}/naive.cpp
  ${CMAKE_CURRENT_LIST_DIR}/fma_probe.cpp)
# The textbook baseline is compiled for the machine it runs on, as a user would
# compile it (the benchmarks run where they are built; the library never is).
set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/naive.cpp PROPERTIES
  COMPILE_OPTIONS "-O3;-march=native")
# ${PROJECT_SOURCE_DIR}/src: kernels/variant_list.hpp, the ISA levels and kernel variants.
target_include_directories(flashcpu_bench_support PUBLIC ${CMAKE_CURRENT_LIST_DIR} ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(flashcpu_bench_support PUBLIC flashcpu::flashcpu OpenMP::OpenMP_CXX)
target_compile_features(flashcpu_bench_support PUBLIC cxx_std_17)
set_target_properties(flashcpu_bench_support PROPERTIES CXX_EXTENSIONS OFF)
target_compile_options(flashcpu_bench_support PRIVATE -Wall -Wextra)
# clang 14 does not vectorize the softmax's float max reduction without fast-math
# (gcc does): it stays scalar there, one cheap pass of three, so hush the warning.
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  target_compile_options(flashcpu_bench_support PRIVATE -Wno-pass-failed)
endif()

# OpenBLAS is optional: without it the baseline is left out (and reported so).
# Its cblas.h must be OpenBLAS's own (it declares openblas_set_num_threads), which
# Debian keeps under include/<triplet>/openblas-<variant>/. pkg-config knows the
# path; without pkg-config fall back to find_library/find_path.
set(FLASHCPU_BENCH_OPENBLAS_FOUND OFF)
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(FLASHCPU_OPENBLAS QUIET IMPORTED_TARGET openblas)
  if(FLASHCPU_OPENBLAS_FOUND)
    target_link_libraries(flashcpu_bench_support PRIVATE PkgConfig::FLASHCPU_OPENBLAS)
    set(FLASHCPU_BENCH_OPENBLAS_FOUND ON)
  endif()
endif()
if(NOT FLASHCPU_BENCH_OPENBLAS_FOUND)
  find_library(FLASHCPU_OPENBLAS_LIBRARY NAMES openblas
               PATH_SUFFIXES openblas-pthread openblas-openmp openblas-serial)
  find_path(FLASHCPU_OPENBLAS_INCLUDE_DIR NAMES cblas.h openblas_config.h
            PATH_SUFFIXES openblas openblas-pthread openblas-openmp openblas-serial
                          x86_64-linux-gnu/openblas-pthread x86_64-linux-gnu/openblas-openmp
                          x86_64-linux-gnu/openblas-serial)
  if(FLASHCPU_OPENBLAS_LIBRARY AND FLASHCPU_OPENBLAS_INCLUDE_DIR)
    target_link_libraries(flashcpu_bench_support PRIVATE ${FLASHCPU_OPENBLAS_LIBRARY})
    target_include_directories(flashcpu_bench_support PRIVATE ${FLASHCPU_OPENBLAS_INCLUDE_DIR})
    set(FLASHCPU_BENCH_OPENBLAS_FOUND ON)
  endif()
endif()
if(FLASHCPU_BENCH_OPENBLAS_FOUND)
  target_compile_definitions(flashcpu_bench_support PRIVATE FLASHCPU_BENCH_HAVE_OPENBLAS)
  message(STATUS "flashcpu bench/tools: OpenBLAS baseline enabled")
else()
  message(STATUS "flashcpu bench/tools: OpenBLAS not found, baseline disabled "
                 "(apt-get install libopenblas-dev)")
endif()
