# The two commands of the README. Each does all the set-up on a fresh machine (scripts/setup.sh),
# and only what changed after that (stamps: a second `make test` skips pip and the build).
#   make bench   the main job: the benchmark (quick CPU grid without a GPU, full grid with one)
#   make test    the test suite (Triton kernels run interpreted on CPU when there is no GPU)
# On a GPU machine (no registry needed; its python3 with torch is used, not a venv):
#   make gpu-check DIR=out   build + GPU tests + sanitizers + bench + profile, 8 minutes
# Here, before it: `make gpu-wheels` (the benchmark's peers, carried as .whl/); after it,
# `make gpu-unpack FROM=<folder with results.tar.gz>` (the build, for a rerun, in .gpu-ext/).
VENV ?= .venv
PY := $(VENV)/bin/python
GPU_PY ?= python3
DIR ?= gpu-check-out

.PHONY: setup bench test lint format cmake-test aot-check cuda-check ci-oldest gpu-check \
	gpu-check-dry-run gpu-wheels gpu-unpack
setup:
	VENV=$(VENV) bash scripts/setup.sh

bench: setup
	$(PY) -m normface_kernels.bench \
	  $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')") $(BENCH_ARGS)

test: setup
	$(PY) -m pytest python_tests -q -ra $(TEST_ARGS)

# ruff over the Python (rules in pyproject.toml) and clang-format over csrc/ (style in
# .clang-format); fails on any finding. Both are pinned in scripts/setup.sh. `make format` applies
# clang-format and ruff's safe fixes in place.
CSRC_FILES = $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CSRC_FILES)
	@echo "== lint: ruff and clang-format clean"

format: setup
	$(VENV)/bin/clang-format -i $(CSRC_FILES)
	$(VENV)/bin/ruff check --fix .

# The same csrc/ built with CMake as a plain libtorch library, loaded and used from Python.
cmake-test: setup
	bash scripts/cmake_check.sh $(PY)

# Every Triton kernel in every configuration its launchers produce (B=1024, C=1M, D=128/512),
# compiled for sm_90 without a GPU: registers, spills, shared memory; fails on a compile error,
# shared memory over the limit, or a spill in a 16-bit kernel. AOT_ARGS="--target sm80 ..." adds.
aot-check: setup
	env -u TRITON_INTERPRET $(PY) -m normface_kernels.triton.aot_check $(AOT_ARGS)

# The CUDA kernels' registers / stack / spills on sm_90 (ptxas -v of the build, cuobjdump of the
# .so); fails on local memory in any of them. Nothing to check in a CPU-only build.
cuda-check: setup
	$(PY) scripts/cuda_resource_check.py

# The oldest supported versions (torch 2.11.0 + triton 3.6.0, the GPU machine's): own venv and
# copy of the tree, CPU-only build, the version-sensitive tests and the AOT check.
ci-oldest:
	bash scripts/ci_oldest.sh

gpu-check:
	$(GPU_PY) scripts/gpu_check.py $(DIR) $(GPU_CHECK_ARGS)

gpu-check-dry-run:
	$(GPU_PY) scripts/gpu_check.py $(DIR) --dry-run $(GPU_CHECK_ARGS)

# The peers the GPU benchmark compares with (pure-Python wheels, pinned), downloaded here for the
# GPU machine's Python 3.12: the device tool carries .whl/ (git ignores it), the peers stage
# installs it there.
PEER_WHEELS = liger-kernel==0.8.5 cut-cross-entropy==25.1.1
gpu-wheels:
	rm -rf .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux2014_x86_64 -d .whl $(PEER_WHEELS)
	@ls .whl

# A GPU check's results.tar.gz (FROM=its folder): ext/ (the build) into .gpu-ext/, which a rerun
# carries to skip the build while csrc/ is unchanged; bench/ into gpu-check-out/bench/.
FROM ?= gpu-check-out
gpu-unpack:
	rm -rf .gpu-ext gpu-check-out/bench && mkdir -p .gpu-ext gpu-check-out
	tar xzf $(FROM)/results.tar.gz -C gpu-check-out
	if [ -d gpu-check-out/ext ]; then mv gpu-check-out/ext/* .gpu-ext/ && rmdir gpu-check-out/ext; fi
	@ls .gpu-ext; ls gpu-check-out/bench 2>/dev/null || true
