#!/usr/bin/env bash
# Builds csrc/ with CMake (CPU kernels) into libnormface.so and checks that
# torch.ops.load_library gives working ops in a process that never imports normface_kernels._C.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
BUILD="${CMAKE_BUILD_DIR:-cmake-build}"
PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
CUDA_ROOT="${CUDA_HOME:-$(ls -d /usr/local/cuda-* 2>/dev/null | sort -V | tail -n 1)}"
# A CUDA build of torch asks CMake for the CUDA toolkit even for a CPU-only library; an explicit
# TORCH_CUDA_ARCH_LIST stops it from probing for a GPU.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
cmake -S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release \
  ${CUDA_ROOT:+-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"} \
  ${CUDA_ROOT:+-DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc"} >/dev/null
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
"$PY" - "$BUILD/libnormface.so" <<'PYEOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
f, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
y = torch.tensor([0, 5, 2, -100])
loss, lse = torch.ops.normface.cosine_softmax_forward(
    f, w, y, torch.tensor(10.0, dtype=torch.float64), 1.0, 0.5, 0.0, 0.0, True, True, -100, 0, -1)
cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
torch.testing.assert_close(lse[3], torch.logsumexp(10.0 * cos[3], 0))
assert loss[3] == 0 and torch.isfinite(loss).all()
print("cmake build OK: libnormface.so registers working normface ops")
PYEOF
