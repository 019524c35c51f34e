#!/usr/bin/env bash
# Everything a fresh machine needs: a virtual environment, torch and the test/bench tools, and
# the extension built in place (CPU kernels always; CUDA kernels when a CUDA toolkit is found,
# GPU or not -- set NORMFACE_NO_CUDA=1 to skip them). Safe to run again: it only rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
echo "== installing dependencies"
"$PY" -m pip install -q --upgrade pip setuptools wheel
# torch >= 2.11; triton for the Triton backend (interpreted on CPU in the tests); the rest for
# the tests, the benchmark (pytorch-metric-learning is one of its peers) and the examples.
"$PY" -m pip install -q "torch>=2.11" "triton>=3.6" numpy ninja pytest expecttest \
  pytest-benchmark matplotlib tqdm scikit-learn pytorch-metric-learning
echo "== building normface_kernels (this compiles C++ and, with a CUDA toolkit, CUDA sources)"
MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" - <<'PYEOF'
import torch, normface_kernels as nk
assert nk._cpp_error is None, nk._cpp_error
print(f"== ready: torch {torch.__version__}, CUDA kernels built: {nk.has_cuda_kernels()}, "
      f"triton: {nk.has_triton()}, GPU: {torch.cuda.is_available()}")
PYEOF
