#!/usr/bin/env bash
# CI at the oldest end of the supported range -- what the GPU machine runs: torch 2.11.0 with
# triton 3.6.0 (its pin), numpy < 2.3 (triton 3.6's interpreter needs it).
#
# Its own venv (.venv-oldest) and its own copy of the checkout (.ci-oldest/): an in-place build
# for another torch must not replace the main one (the two .so files have the same name). The
# build is CPU-only (NORMFACE_NO_CUDA=1: the CUDA kernels compile in the main job). Then:
#   - the tests that tell whether this torch/triton pair works: the Triton ops registered without
#     the interpreter (schemas from annotations), the interpreted Triton kernels, opcheck and
#     torch.compile of every op, the CPU kernels against the reference, the AOT check's own tests,
#     the GPU check's plumbing and profile script, the benchmark (both run there on this torch);
#   - the AOT compile check with triton 3.6's compiler for sm_90.
# Incremental like scripts/setup.sh: a second run with nothing changed skips pip and the build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${OLDEST_VENV:-$ROOT/.venv-oldest}"
TREE="$ROOT/.ci-oldest"
OLDEST_DEPS="torch==2.11.0 triton==3.6.0 numpy<2.3 ninja pytest expecttest hypothesis \
scikit-learn"
OLDEST_TESTS="${OLDEST_TESTS:-python_tests/test_triton_registration.py \
python_tests/test_triton.py python_tests/test_ops_registration.py \
python_tests/test_cuda_registration.py python_tests/test_cosine_softmax.py \
python_tests/test_agent_losses.py python_tests/test_bad_input.py python_tests/test_module.py \
python_tests/test_aot_check.py python_tests/test_gpu_check.py python_tests/test_bench.py}"

echo "== oldest supported versions: copying the checkout to $TREE"
mkdir -p "$TREE"
# Keep the previous build (objects, stamp, the .so) so that nothing changed means nothing to do;
# everything else is replaced, so files deleted here disappear there too.
find "$TREE" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$TREE"
else
  tar --exclude=./.venv --exclude=./.venv-oldest --exclude=./.ci-oldest --exclude=./build \
      --exclude='*.so' -cf - . | tar -xf - -C "$TREE"
fi
if [ -d "$TREE/build/oldest-keep" ]; then
  cp -p "$TREE"/build/oldest-keep/* "$TREE/normface_kernels/" 2>/dev/null || true
fi

cd "$TREE"
VENV="$VENV" NORMFACE_DEPS="$OLDEST_DEPS" NORMFACE_NO_CUDA=1 bash scripts/setup.sh
mkdir -p build/oldest-keep
cp -p normface_kernels/_C*.so normface_kernels/_build_info.py build/oldest-keep/

echo "== oldest: tests"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -ra $OLDEST_TESTS ${TEST_ARGS:-}

echo "== oldest: AOT compile check (triton 3.6, sm_90)"
env -u TRITON_INTERPRET "$VENV/bin/python" -m normface_kernels.triton.aot_check ${AOT_ARGS:-}
