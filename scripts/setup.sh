#!/usr/bin/env bash
# Installs what nanogpt-flash needs: the Python packages (torch pinned to the CPU wheel) and a
# project-local ispc in .ispc/ (without ispc the build uses the C++ twin kernels). Says what it
# does at each step: the package step can take minutes on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "setup: installing the Python packages of requirements.txt (torch==2.13.0, the CPU wheel; minutes on a fresh machine) ..."
python -m pip install -q -r requirements.txt
echo "setup: installing a project-local ispc into .ispc/ (scripts/install_ispc.sh) ..."
bash scripts/install_ispc.sh || echo "setup: ispc could not be installed; the C++ kernels will be built"
echo "setup: done. The first use of the kernels compiles them (about a minute, once)."
