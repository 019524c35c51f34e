# The two commands of the README. Each does all the set-up on a fresh machine (scripts/setup.sh).
#   make bench   the main job: the benchmark (quick CPU grid without a GPU, full grid with one)
#   make test    the test suite (Triton kernels run interpreted on CPU when there is no GPU)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup bench test cmake-test aot-check
setup:
	VENV=$(VENV) bash scripts/setup.sh

bench: setup
	$(PY) -m normface_kernels.bench $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')") $(BENCH_ARGS)

test: setup
	$(PY) -m pytest python_tests -q -ra $(TEST_ARGS)

# The same csrc/ built with CMake as a plain libtorch library, loaded and used from Python.
cmake-test: setup
	bash scripts/cmake_check.sh $(PY)

# Every Triton kernel in every configuration its launchers produce (B=1024, C=1M, D=128/512),
# compiled for sm_90 without a GPU: registers, spills, shared memory; fails on a compile error,
# shared memory over the limit, or a spill in a 16-bit kernel. AOT_ARGS="--target sm80 ..." adds.
aot-check: setup
	env -u TRITON_INTERPRET $(PY) -m normface_kernels.triton.aot_check $(AOT_ARGS)
