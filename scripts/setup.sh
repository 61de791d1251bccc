#!/usr/bin/env bash
# Installs what nanogpt-flash needs: the Python packages (torch pinned to the CPU wheel) and a
# project-local ispc in .ispc/ (without ispc the build uses the C++ twin kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
bash scripts/install_ispc.sh || echo "setup: ispc could not be installed; the C++ kernels will be built"
