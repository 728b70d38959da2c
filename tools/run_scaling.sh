#!/usr/bin/env bash
# The scaling job: fused vs naive (textbook fp32) vs OpenBLAS attention as the sequence grows, from a
# fresh Debian 12 machine (as root) to a table, build/scaling.csv and build/scaling.png.
#
#   bash tools/run_scaling.sh            # quick: N = M from 256 to 4096 (1-2 minutes)
#   bash tools/run_scaling.sh --full     # N = M from 256 to 16384 (several minutes)
#   bash tools/run_scaling.sh --full --causal --threads 1   # extra flags go to the sweep
#   bash tools/run_scaling.sh --dtype bf16kv   # fp32 q over bf16 K/V: build/scaling_bf16kv.csv, .png
#   bash tools/run_scaling.sh --also-dtype bf16   # fp32, and fused on bf16 data as one more line
#
# Steps: install missing packages (tools/install_deps.sh), configure a Release build
# in ./build, build only flashcpu-sweep, run it, plot. --dtype (fp32, bf16, fp16, bf16kv,
# fp16kv) names the outputs after the type when not fp32. See flashcpu-sweep --help.
set -euo pipefail

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
root="$(dirname "$(dirname "$self")")"
cd "$root"

mode=(--quick)
extra=()
out=build/scaling
prev=
for arg in "$@"; do
  case "$arg" in
    --full) mode=() ;;
    --quick) mode=(--quick) ;;
    -h|--help) sed -n '2,13p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *)
      extra+=("$arg")
      # The value of --dtype (the sweep checks it): one output per type, fp32 as before.
      if [ "$prev" = --dtype ] && [ "$arg" != fp32 ]; then out="build/scaling_$arg"; fi
      ;;
  esac
  prev=$arg
done

bash tools/install_deps.sh

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHCPU_BUILD_TESTS=OFF -DFLASHCPU_BUILD_TOOLS=ON
cmake --build build --target flashcpu-sweep

# OMP_WAIT_POLICY is left as the caller has it: the OpenBLAS baseline runs
# single-threaded inside OpenMP, so spinning OpenMP threads do not slow it, while
# PASSIVE would add ~0.1 ms of thread wake-up to every call (bench/README.md).
# The commit goes into the CSV, so a table rendered from it names what was measured.
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit-dirty"
FLASHCPU_BENCH_COMMIT=$commit ./build/tools/flashcpu-sweep "${mode[@]}" "${extra[@]}" --csv "$out.csv"

# Debian's matplotlib lives in the system python; a python3 earlier on PATH (pyenv,
# venv) may lack it.
py=python3
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1; then
  py=/usr/bin/python3
fi
"$py" tools/plot_scaling.py "$out.csv" "$out.png"
