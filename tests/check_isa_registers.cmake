# ISA honesty: each ISA's kernel object uses no register wider than its ISA has. The
# SSE2 kernels must hold no ymm or zmm instruction and the AVX2 kernels no zmm one, or
# the "sse2" path would crash (or silently need AVX) on a CPU without them. Also every
# object compiled for the baseline (the driver, dispatch, reference, validation) must
# hold no ymm or zmm instruction: only the kernel objects are built with ISA flags.
#   cmake -DOBJDUMP=<objdump> -DOBJECTS="a.o|b.o|..." -P check_isa_registers.cmake
string(REPLACE "|" ";" OBJECTS "${OBJECTS}")
if(NOT OBJDUMP OR NOT OBJECTS)
  message(FATAL_ERROR "usage: cmake -DOBJDUMP=objdump -DOBJECTS=a.o|b.o -P check_isa_registers.cmake")
endif()
set(checked "")
foreach(object IN LISTS OBJECTS)
  get_filename_component(name "${object}" NAME)
  if(name MATCHES "avx512")
    continue()  # may use every register
  elseif(name MATCHES "avx2")
    set(forbidden "%zmm")
  else()
    set(forbidden "%ymm|%zmm")
  endif()
  execute_process(COMMAND "${OBJDUMP}" -d --no-show-raw-insn "${object}"
                  OUTPUT_VARIABLE listing RESULT_VARIABLE failed)
  if(failed)
    message(FATAL_ERROR "objdump failed on ${object}")
  endif()
  # Sanity: the disassembly is there (a kernel object holds thousands of instructions).
  string(LENGTH "${listing}" length)
  if(length LESS 1000)
    message(FATAL_ERROR "objdump printed almost nothing for ${object}")
  endif()
  string(REGEX MATCH "[^\n]*(${forbidden})[^\n]*" hit "${listing}")
  if(hit)
    message(FATAL_ERROR "${name} holds a register its ISA lacks:\n  ${hit}")
  endif()
  list(APPEND checked "${name} (no ${forbidden})")
endforeach()
# The check must have seen the lower ISAs' kernels, or it tested nothing.
foreach(needed forward_avx2 forward_sse2)
  string(FIND "${checked}" "${needed}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "no ${needed} object among: ${OBJECTS}")
  endif()
endforeach()
string(REPLACE ";" "\n  " report "${checked}")
message(STATUS "checked:\n  ${report}")
