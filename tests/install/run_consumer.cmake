# Driver for the consumer tests (cmake -P). Configures, builds and runs the consumer
# project in ${CONSUMERS_DIR}/${MODE}, which must print "flashcpu consumer: OK".
#
#   MODE=find-package      installs ${FLASHCPU_BINARY_DIR} into ${WORK_DIR}/prefix, checks
#                          what was installed, then builds the consumer with
#                          CMAKE_PREFIX_PATH=<prefix>
#   MODE=add-subdirectory  builds the consumer, which adds ${FLASHCPU_SOURCE_DIR}
#
# Other inputs: WORK_DIR (wiped first), GENERATOR, CXX_COMPILER, BUILD_TYPE.
cmake_minimum_required(VERSION 3.25)

foreach(var MODE WORK_DIR CONSUMERS_DIR FLASHCPU_SOURCE_DIR FLASHCPU_BINARY_DIR GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

function(run)
  string(REPLACE ";" " " shown "${ARGV}")
  message(STATUS "run: ${shown}")
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${shown}")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

set(configure_args -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
if(CXX_COMPILER)
  list(APPEND configure_args -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
endif()

if(MODE STREQUAL "find-package")
  set(prefix "${WORK_DIR}/prefix")
  run(${CMAKE_COMMAND} --install "${FLASHCPU_BINARY_DIR}" --prefix "${prefix}" --config ${BUILD_TYPE})
  # The public header, the library and the package files are installed...
  foreach(f include/flashcpu/flashcpu.hpp)
    if(NOT EXISTS "${prefix}/${f}")
      message(FATAL_ERROR "not installed: ${prefix}/${f}")
    endif()
  endforeach()
  file(GLOB_RECURSE configs "${prefix}/*/flashcpuConfig.cmake")
  file(GLOB_RECURSE versions "${prefix}/*/flashcpuConfigVersion.cmake")
  if(NOT configs OR NOT versions)
    message(FATAL_ERROR "flashcpuConfig.cmake / flashcpuConfigVersion.cmake not installed under ${prefix}")
  endif()
  # ...and nothing of the private SIMD dependency.
  file(GLOB_RECURSE leaked "${prefix}/*xsimd*")
  if(leaked)
    message(FATAL_ERROR "private dependency installed: ${leaked}")
  endif()
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(MODE STREQUAL "add-subdirectory")
  list(APPEND configure_args "-DFLASHCPU_SOURCE_DIR=${FLASHCPU_SOURCE_DIR}")
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()

set(build "${WORK_DIR}/build")
run(${CMAKE_COMMAND} -S "${CONSUMERS_DIR}/${MODE}" -B "${build}" ${configure_args})
run(${CMAKE_COMMAND} --build "${build}" --config ${BUILD_TYPE})

find_program(app NAMES consumer PATHS "${build}" "${build}/${BUILD_TYPE}" NO_DEFAULT_PATH REQUIRED)
execute_process(COMMAND "${app}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message(STATUS "${out}${err}")
if(NOT rc EQUAL 0 OR NOT out MATCHES "flashcpu consumer: OK")
  message(FATAL_ERROR "consumer failed (exit ${rc})")
endif()
