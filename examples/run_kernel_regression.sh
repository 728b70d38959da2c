#!/usr/bin/env bash
# Attention as Nadaraya-Watson kernel regression, end to end: from a fresh Debian 12
# machine (as root, or with sudo) to the MSE table, the learned kernel width and the
# four plots.
#
#   bash examples/run_kernel_regression.sh                # the default data set
#   bash examples/run_kernel_regression.sh --seed 7       # another data set, for both programs
#
# Steps: install the missing Debian packages (checked with dpkg -s first), configure a
# Release build in ./build, build only flashcpu-kernel-regression and
# flashcpu-kernel-regression-train, run both with their CSVs going to
# build/kernel-regression/, and draw kernel_regression_fits.png,
# kernel_regression_weights.png, kernel_regression_training_fit.png and
# kernel_regression_training_loss.png there. Flags: --seed N goes to both programs,
# --weights-bandwidth H to the first, --w0 W and --epochs N to the second. Runs from
# the repository root wherever it is called from. Exits with the first nonzero status
# (1 if a check failed), after plotting what was written.
# See also: build/examples/flashcpu-kernel-regression --help (and -train --help)
set -euo pipefail

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
root="$(dirname "$(dirname "$self")")"
cd "$root"

# Each flag goes to the program that knows it; both take --seed, so both see one data set.
regression_args=()
train_args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,18p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --out|--out=*) echo "run_kernel_regression: the output directory is fixed (build/kernel-regression)" >&2; exit 2 ;;
    --seed|--weights-bandwidth|--w0|--epochs)
      if [ "$#" -lt 2 ]; then
        echo "run_kernel_regression: $1 needs a value" >&2
        exit 2
      fi
      case "$1" in
        --seed) regression_args+=("$1" "$2"); train_args+=("$1" "$2") ;;
        --weights-bandwidth) regression_args+=("$1" "$2") ;;
        *) train_args+=("$1" "$2") ;;
      esac
      shift 2 ;;
    *) echo "run_kernel_regression: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# 1. Packages: the project's one installer (only the missing ones; a second run installs nothing).
bash tools/install_deps.sh

# 2. Configure and build only the examples.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLASHCPU_BUILD_TESTS=OFF -DFLASHCPU_BUILD_BENCH=OFF \
  -DFLASHCPU_BUILD_TOOLS=OFF -DFLASHCPU_BUILD_EXAMPLES=ON
cmake --build build --target flashcpu-kernel-regression flashcpu-kernel-regression-train

# 3. Run: the MSE table and the cross-checks, then the training, the grid search and the
# gradient check; each writes its CSVs. The second runs even if the first fails.
status=0
./build/examples/flashcpu-kernel-regression --out build/kernel-regression ${regression_args[@]+"${regression_args[@]}"} \
  || status=$?
echo
train_status=0
./build/examples/flashcpu-kernel-regression-train --out build/kernel-regression ${train_args[@]+"${train_args[@]}"} \
  || train_status=$?
status=$((status ? status : train_status))

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
