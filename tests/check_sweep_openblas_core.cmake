# Runs flashcpu-sweep as if OpenBLAS had picked its SSE3 "Prescott" kernels (what
# Debian's OpenBLAS 0.3.21 does on CPUs newer than it), and checks that the sweep
# re-ran itself with the best core this CPU supports, said so, and recorded the core
# that really ran in its CSV header line and rows.
#   cmake -DSWEEP=<flashcpu-sweep> -DWORK_DIR=<dir> -P check_sweep_openblas_core.cmake
file(MAKE_DIRECTORY ${WORK_DIR})
set(csv ${WORK_DIR}/sweep.csv)
file(REMOVE ${csv})
execute_process(
  COMMAND ${CMAKE_COMMAND} -E env FLASHCPU_BENCH_TEST_OPENBLAS_DETECTED=Prescott
          ${SWEEP} --min 64 --max 128 --reps 1 --causal --csv ${csv}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "flashcpu-sweep failed (${rc}):\n${out}\n${err}")
endif()
file(READ ${csv} rows)
if(NOT rows MATCHES "openblas_core")
  message(FATAL_ERROR "the CSV has no openblas_core column:\n${rows}")
endif()
if(out MATCHES "OpenBLAS core ([A-Za-z0-9_]+)")
  set(core ${CMAKE_MATCH_1})
else()
  message(STATUS "no OpenBLAS in this build: nothing to check\n${out}")
  return()
endif()

# What this CPU supports, as Linux lists it.
file(READ /proc/cpuinfo cpuinfo)
set(expected "")
if(cpuinfo MATCHES " avx2" AND cpuinfo MATCHES " fma")
  set(expected "Haswell")
endif()
if(cpuinfo MATCHES " avx512f" AND cpuinfo MATCHES " avx512dq" AND cpuinfo MATCHES " avx512bw"
   AND cpuinfo MATCHES " avx512vl")
  set(expected "SkylakeX")
  if(cpuinfo MATCHES " avx512_bf16")
    set(expected "Cooperlake")
  endif()
endif()

if(expected STREQUAL "")
  # Nothing better than SSE to offer: the sweep must not re-run.
  if(err MATCHES "re-running with OPENBLAS_CORETYPE")
    message(FATAL_ERROR "re-ran on a CPU without AVX2:\n${err}")
  endif()
  message(STATUS "CPU without AVX2+FMA: no re-run expected, none made (core ${core})")
  return()
endif()
if(NOT err MATCHES "re-running with OPENBLAS_CORETYPE=${expected}")
  message(FATAL_ERROR "expected a re-run with OPENBLAS_CORETYPE=${expected}:\n${err}")
endif()
if(NOT out MATCHES "re-ran itself with OPENBLAS_CORETYPE=${expected}")
  message(FATAL_ERROR "the table header does not say how the core was chosen:\n${out}")
endif()
if(core STREQUAL "Prescott" OR NOT rows MATCHES ",${core},")
  message(FATAL_ERROR "core ${core} ran; the CSV says:\n${rows}")
endif()
message(STATUS "Prescott was replaced: OpenBLAS ran ${core} (asked for ${expected})")
