#!/usr/bin/env bash
# Attention as Nadaraya-Watson kernel regression, end to end: from a fresh Debian 12
# machine (as root, or with sudo) to the MSE table and the two plots.
#
#   bash examples/run_kernel_regression.sh                # the default data set
#   bash examples/run_kernel_regression.sh --seed 7       # extra flags go to the program
#
# Steps: install the missing Debian packages (checked with dpkg -s first), configure a
# Release build in ./build, build only flashcpu-kernel-regression, run it with its
# CSVs going to build/kernel-regression/, and draw build/kernel-regression/
# kernel_regression_fits.png and kernel_regression_weights.png. Runs from the
# repository root wherever it is called from. Exits with the program's status
# (1 if a cross-check failed), after plotting what it wrote.
# See also: build/examples/flashcpu-kernel-regression --help
set -euo pipefail

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
root="$(dirname "$(dirname "$self")")"
cd "$root"

for arg in "$@"; do
  case "$arg" in
    -h|--help) sed -n '2,14p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --out|--out=*) echo "run_kernel_regression: the output directory is fixed (build/kernel-regression)" >&2; exit 2 ;;
  esac
done

# 1. Packages: the project's one installer (only the missing ones; a second run installs nothing).
bash tools/install_deps.sh

# 2. Configure and build only the example.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHCPU_BUILD_TESTS=OFF -DFLASHCPU_BUILD_BENCH=OFF \
  -DFLASHCPU_BUILD_TOOLS=OFF -DFLASHCPU_BUILD_EXAMPLES=ON
cmake --build build --target flashcpu-kernel-regression

# 3. Run: prints the MSE table and the cross-checks, writes the CSVs.
status=0
./build/examples/flashcpu-kernel-regression --out build/kernel-regression "$@" || status=$?

# 4. Plot. Debian's matplotlib lives in the system python; a python3 earlier on PATH
# (pyenv, venv) may lack it.
py=python3
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1; then
  py=/usr/bin/python3
fi
"$py" examples/plot_kernel_regression.py build/kernel-regression || status=$((status ? status : $?))

if [ "$status" -ne 0 ]; then
  echo "run_kernel_regression: finished with status $status (see the messages above)" >&2
fi
exit "$status"
