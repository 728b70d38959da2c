#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs missing Debian packages, builds in
# Release (library, tests, benchmarks and tools, so they all compile) and runs every
# test under each ISA, then rebuilds the tests with AddressSanitizer and
# UndefinedBehaviorSanitizer and runs them again, and runs the concurrency tests under
# ThreadSanitizer (clang + LLVM's OpenMP).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install_deps.sh

jobs=$(nproc)
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build/release -j "$jobs"
ctest --test-dir build/release --output-on-failure -j "$jobs" | tee build/release/ctest.log

# -O1: fast enough to run the randomized suite, still precise stack traces.
cmake -S . -B build/sanitize -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
      -DFLASHCPU_SANITIZE=ON -DFLASHCPU_BUILD_BENCH=OFF -DFLASHCPU_BUILD_TOOLS=OFF
cmake --build build/sanitize -j "$jobs"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build/sanitize --output-on-failure -LE install -j "$jobs"
# ThreadSanitizer on the tests of concurrent calls. GCC's libgomp is not instrumented,
# so TSan would report races inside it that are not there: this build uses clang with
# LLVM's OpenMP, whose Archer tool tells TSan about OpenMP's synchronization.
cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DFLASHCPU_SANITIZE_THREAD=ON \
      -DFLASHCPU_BUILD_BENCH=OFF -DFLASHCPU_BUILD_TOOLS=OFF -DFLASHCPU_BUILD_EXAMPLES=OFF -DFLASHCPU_INSTALL=OFF
cmake --build build/tsan -j "$jobs" --target flashcpu_tests
OMP_TOOL_LIBRARIES=/usr/lib/llvm-14/lib/libarcher.so TSAN_OPTIONS="halt_on_error=1 ignore_noninstrumented_modules=1" \
  build/tsan/tests/flashcpu_tests "[threads]"

# The ISA levels this CPU could not run, named on the last line: a green run on a smaller
# CPU must not pass for full coverage.
skipped=$(sed -n 's/.*flashcpu_tests_\([a-z0-9]*\) (Skipped).*/\1/p' build/release/ctest.log | sort -u | tr '\n' ' ')
if [ -n "$skipped" ]; then
  echo "flashcpu: all tests passed (Release, ASan+UBSan, TSan); NOT RUN for lack of hardware: ${skipped% }"
else
  echo "flashcpu: all tests passed (Release, ASan+UBSan, TSan) on every ISA level"
fi
