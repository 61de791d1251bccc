#!/usr/bin/env bash
# Builds the extension with AddressSanitizer and UBSan (NANOGPT_SANITIZE=1: its own build
# folder; the ISPC objects are linked in when ispc is found) and runs the kernel tests under
# it, the sanitizer runtimes preloaded into Python. Any report aborts the run with an error.
#   bash scripts/sanitize.sh [pytest arguments]     (default: the attention and course tests)
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOGPT_SANITIZE=1
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# Python's own allocations are not ours to judge: leaks are off, everything else is on.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:symbolize=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/test_attention.py tests/test_course.py)
python -m pytest -q -p no:cacheprovider "${args[@]}"
