# Runs flashcpu-sweep with --also-dtype bf16 and checks that the fused line of the
# second type is in the CSV: its own rows, impl fused_bf16 and dtype bf16, at every N,
# beside the fp32 rows; that the header names the routes the sweep's calls take; and that
# the sweep refuses its own type as the second one.
#   cmake -DSWEEP=<flashcpu-sweep> -DWORK_DIR=<dir> -P check_sweep_also_dtype.cmake
file(MAKE_DIRECTORY ${WORK_DIR})
set(csv ${WORK_DIR}/sweep.csv)
file(REMOVE ${csv})
execute_process(
  COMMAND ${SWEEP} --min 32 --max 64 --reps 1 --no-blas --also-dtype bf16 --csv ${csv}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "flashcpu-sweep --also-dtype bf16 failed (${rc}):\n${out}\n${err}")
endif()
file(STRINGS ${csv} rows)
foreach(n 32 64)
  set(fp32_row "")
  set(bf16_row "")
  foreach(row IN LISTS rows)
    if(row MATCHES "^${n},${n},[^,]*,[^,]*,[^,]*,[^,]*,fp32,[^,]*,[^,]*,fused,ok,")
      set(fp32_row "${row}")
    elseif(row MATCHES "^${n},${n},[^,]*,[^,]*,[^,]*,[^,]*,bf16,[^,]*,[^,]*,fused_bf16,ok,")
      set(bf16_row "${row}")
    endif()
  endforeach()
  if(fp32_row STREQUAL "" OR bf16_row STREQUAL "")
    message(FATAL_ERROR "N=${n}: expected an fp32 fused row and a bf16 fused_bf16 row:\n${rows}")
  endif()
endforeach()
if(NOT out MATCHES "fused_bf16")
  message(FATAL_ERROR "the table has no fused_bf16 column:\n${out}")
endif()
# The header names the route of the sweep's calls: N = M = 32 (32 rows per head) takes the
# decode driver, 64 the prefill tiles; the header once named an N = M = 1 call's route.
if(NOT out MATCHES "isa [^\n]*decode[^\n]*; at N = M = 64: [^\n]*br=")
  message(FATAL_ERROR "the header must name the first N's route and the last N's (br=...):\n${out}")
endif()
execute_process(
  COMMAND ${SWEEP} --min 32 --max 32 --reps 1 --no-blas --also-dtype fp32 --csv ${WORK_DIR}/same.csv
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "the sweep's own type")
  message(FATAL_ERROR "--also-dtype of the sweep's own type must be refused (${rc}):\n${err}")
endif()
