# ISA honesty: each kernel variant's object uses no register wider than its level has
# (the widest_register of its line in src/kernels/variants.inc). The SSE2 kernels must
# hold no ymm or zmm instruction and the AVX2 kernels no zmm one, or the "sse2" path would
# crash (or silently need AVX) on a CPU without them. Also every object compiled for the
# baseline (the driver, dispatch, reference, validation) must hold no ymm or zmm
# instruction: only the kernel objects are built with ISA flags.
#   cmake -DOBJDUMP=<objdump> -DOBJECTS="a.o|b.o|..." -DREGISTERS="sse2=xmm|avx2=ymm|..." -P check_isa_registers.cmake
string(REPLACE "|" ";" OBJECTS "${OBJECTS}")
string(REPLACE "|" ";" REGISTERS "${REGISTERS}")
if(NOT OBJDUMP OR NOT OBJECTS OR NOT REGISTERS)
  message(FATAL_ERROR "usage: cmake -DOBJDUMP=objdump -DOBJECTS=a.o|b.o -DREGISTERS=sse2=xmm|... -P check_isa_registers.cmake")
endif()
foreach(entry IN LISTS REGISTERS)
  string(REPLACE "=" ";" pair "${entry}")
  list(GET pair 0 level)
  list(GET pair 1 register)
  set(widest_${level} ${register})
endforeach()
set(checked "")
set(levels_seen "")
foreach(object IN LISTS OBJECTS)
  get_filename_component(name "${object}" NAME)
  set(widest xmm)  # the baseline
  if(name MATCHES "_attn_fwd_[0-9x]+__([a-z0-9_]+)\\.cpp")
    set(widest ${widest_${CMAKE_MATCH_1}})
    list(APPEND levels_seen ${CMAKE_MATCH_1})
  endif()
  if(widest STREQUAL "zmm")
    continue()  # may use every register
  elseif(widest STREQUAL "ymm")
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
# The check must have seen the kernels of every level below zmm, or it tested nothing.
foreach(entry IN LISTS REGISTERS)
  string(REPLACE "=" ";" pair "${entry}")
  list(GET pair 0 level)
  list(GET pair 1 register)
  list(FIND levels_seen "${level}" seen)
  if(NOT register STREQUAL "zmm" AND seen EQUAL -1)
    message(FATAL_ERROR "no kernel object of level ${level} among: ${OBJECTS}")
  endif()
endforeach()
string(REPLACE ";" "\n  " report "${checked}")
message(STATUS "checked:\n  ${report}")
