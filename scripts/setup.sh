#!/usr/bin/env bash
# Everything a fresh machine needs: a virtual environment, torch and the test/bench tools, and
# the extension built in place (CPU kernels always; CUDA kernels when a CUDA toolkit is found,
# GPU or not -- set NORMFACE_NO_CUDA=1 to skip them).
#
# Incremental: with nothing changed it takes seconds. The dependencies are installed again only
# when their list, the Python or the checkout's path changes (stamp $VENV/.normface-deps); the
# extension is rebuilt only when csrc/, setup.py, the build switches or torch change (stamp
# build/normface-build.stamp), and then ninja recompiles only what changed. SETUP_FORCE=1 redoes
# both. The build's output, ptxas -v included, is kept in build/normface-build.log.
#
#   VENV=.venv PYTHON=python3 NORMFACE_DEPS="..." bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# torch >= 2.11; triton for the Triton backend (interpreted on CPU in the tests); the rest for
# the tests (hypothesis: the fuzz tests), the benchmark (pytorch-metric-learning is one of its
# peers), the examples and `make lint` (ruff and clang-format, pinned: a newer release may
# format or flag differently). The oldest-versions CI job pins its own list (scripts/ci_oldest.sh).
DEPS="${NORMFACE_DEPS:-torch>=2.11 triton>=3.6 numpy ninja pytest expecttest hypothesis \
pytest-benchmark matplotlib tqdm scikit-learn pytorch-metric-learning ruff==0.17.5 \
clang-format==23.1.3}"
FORCE="${SETUP_FORCE:-0}"

key() { sha256sum | cut -c1-32; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

deps_key="$( { echo "$DEPS"; "$PY" -V; pwd; } | key)"
if [ "$FORCE" != 1 ] && [ "$(cat "$VENV/.normface-deps" 2>/dev/null)" = "$deps_key" ]; then
  echo "== dependencies up to date ($VENV)"
else
  echo "== installing dependencies"
  rm -f "$VENV/.normface-deps"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  # shellcheck disable=SC2086  # one word per requirement
  "$PY" -m pip install -q $DEPS
  # The package itself, editable; its extension is built in place below (incrementally).
  NORMFACE_SKIP_EXTENSION=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$deps_key" > "$VENV/.normface-deps"
fi

build_key="$( {
  find csrc -type f | LC_ALL=C sort | xargs sha256sum
  sha256sum setup.py
  "$PY" -c 'import importlib.metadata as m; print(m.version("torch"))'
  echo "${NORMFACE_NO_CUDA:-0}|${TORCH_CUDA_ARCH_LIST:-}|${CUDA_HOME:-}|$(cd "$VENV" && pwd)"
} | key)"
so="$(ls normface_kernels/_C*.so 2>/dev/null | head -n 1 || true)"
if [ "$FORCE" != 1 ] && [ -n "$so" ] && [ -f normface_kernels/_build_info.py ] \
    && [ "$(cat build/normface-build.stamp 2>/dev/null)" = "$build_key" ]; then
  echo "== extension up to date ($so)"
else
  echo "== building normface_kernels (C++ and, with a CUDA toolkit, CUDA sources;" \
       "log: build/normface-build.log)"
  mkdir -p build
  rm -f build/normface-build.stamp
  start=$SECONDS
  if ! MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace \
      > build/normface-build.log 2>&1; then
    tail -n 60 build/normface-build.log
    echo "== build FAILED (full log: build/normface-build.log)"
    exit 1
  fi
  grep -E "^normface_kernels:" build/normface-build.log || true
  echo "== built in $((SECONDS - start)) s"
  echo "$build_key" > build/normface-build.stamp
fi

"$PY" - <<'PYEOF'
import torch, normface_kernels as nk
assert nk._cpp_error is None, nk._cpp_error
print(f"== ready: torch {torch.__version__}, CUDA kernels built: {nk.has_cuda_kernels()}, "
      f"triton: {nk.has_triton()}, GPU: {torch.cuda.is_available()}")
PYEOF
