"""contract "Bad input": every case of bad_input_cases.py (each op of torch.ops.normface, C++ and
triton_*, each public function on each backend, NormFaceLoss) raises ValueError (TORCH_CHECK_VALUE
in C++; RuntimeError only where PyTorch's dispatcher rejects an argument's Python type before the
op runs) whose message names the argument -- never a crash, a hang or silent garbage.

The cases run in one long-lived worker process (bad_input_cases.py), restarted after a crash:
a segfault or abort fails its own case, a hang times out, and pytest carries on.
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading

import bad_input_cases as table
import pytest
import torch

import normface_kernels as nk

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_TIMEOUT_S = 120  # the first case also pays the worker's start (imports)
CASES = table.cases()
CHECKS_OFF = " [checks off]"


class Worker:
    """`python bad_input_cases.py` fed one case name per line; started again after it dies."""

    def __init__(self):
        self.proc = None
        self.stderr = None

    def _start(self):
        # The worker imports the normface_kernels that this process imported.
        root = os.path.dirname(os.path.dirname(os.path.abspath(nk.__file__)))
        path = os.pathsep.join(p for p in (root, HERE, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path, TRITON_INTERPRET="1")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.join(HERE, "bad_input_cases.py")], cwd=HERE, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.answers = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.answers), daemon=True).start()

    @staticmethod
    def _read(proc, answers):
        for line in proc.stdout:
            answers.put(line)
        answers.put(None)  # end of file: the worker died

    def _stderr_tail(self):
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def run(self, name):
        if self.proc is None:
            self._start()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        try:
            line = self.answers.get(timeout=CASE_TIMEOUT_S)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"status": "hang", "message": f"no answer in {CASE_TIMEOUT_S} s"}
        if line is None:
            code = self.proc.wait()
            self.proc = None
            return {"status": "crash", "message": f"exit code {code}: {self._stderr_tail()}"}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _params():
    params = []
    for name in sorted(CASES):
        params.append(pytest.param(name, id=name))
        # Data checks (label range, scale value, hardest range) stay on for CPU tensors even
        # when switched off (set_data_checks(False) only spares CUDA syncs).
        if name.startswith("op:") and name.endswith(table.DATA_CASES):
            params.append(pytest.param(name + CHECKS_OFF, id=name + CHECKS_OFF))
    return params


@pytest.mark.parametrize("name", _params())
def test_bad_input_raises_naming_the_argument(worker, name):
    word = CASES[name[:-len(CHECKS_OFF)] if name.endswith(CHECKS_OFF) else name][0]
    answer = worker.run(name)
    if answer["status"] == "skip":
        pytest.skip(answer["message"])
    assert answer["status"] == "raised", f"{name}: {answer}"
    # ValueError on every backend; the one exception is PyTorch's own: an op called directly with
    # an argument of the wrong Python type (a list for a Tensor, a str or an overflowing int for
    # an int) is rejected by the dispatcher's argument parser, before any of our code runs, with
    # RuntimeError -- the same for every op.
    dispatcher = (answer["type"] == "RuntimeError" and name.startswith("op:")
                  and "Expected a value of type" in answer["message"])
    assert answer["type"] == "ValueError" or dispatcher, f"{name}: {answer}"
    assert word in answer["message"], f"{name}: the message does not name {word!r}: {answer}"


def test_the_worker_reports_a_crash_and_carries_on(worker):
    """The harness itself: an abort fails one case, and the next case runs in a new worker."""
    assert worker.run("__abort__")["status"] == "crash"
    answer = worker.run("op:center_loss/labels=too_large")
    assert answer["status"] == "raised" and "labels" in answer["message"]


def test_every_op_is_in_the_table():
    """A new op of torch.ops.normface must get its bad-input cases too."""
    names = {n.split("/")[0][len("op:"):] for n in CASES if n.startswith("op:")}
    cpp = set(table.CPP_OPS) | set(table.SETTINGS_OPS)
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("normface::") and "triton_" not in n}
    assert registered <= cpp <= names
    assert set(table.TRITON_OPS) <= names


def test_all_meta_inputs_give_meta_results_of_the_right_shape():
    """Meta tensors (no data): every public function returns the shapes the contract says."""
    f, w, y = (t.to("meta") for t in (torch.randn(4, 5), torch.randn(6, 5), torch.arange(4)))
    for fn in (nk.cosine_softmax, nk.c_contrastive, nk.c_triplet, nk.center_loss):
        for backend in ("auto", "reference"):
            out = fn(f, w, y, reduction="none", backend=backend)
            assert out.device.type == "meta" and out.shape == (4,), (fn.__name__, backend)
    assert nk.cosine_logits(f, w, 2.0).shape == (4, 6)
    assert nk.l2_normalize(f).shape == (4, 5)


def test_module_uses_a_small_fixed_scale_as_given():
    """contract "Module": a fixed scale must be finite and > 0 -- and 0.001 is, so it is used."""
    torch.manual_seed(0)
    module = nk.NormFaceLoss(5, 6, scale=0.001)
    f, y = torch.randn(4, 5), torch.arange(4)
    expected = nk.cosine_softmax(f, module.weight, y, 0.001, backend="reference")
    torch.testing.assert_close(module(f, y), expected)


def test_unavailable_backend_says_what_is_missing():
    f, w, y = torch.randn(4, 5), torch.randn(6, 5), torch.arange(4)
    if not nk.has_cuda_kernels():
        with pytest.raises(RuntimeError, match="without CUDA kernels"):
            nk.cosine_softmax(f, w, y, backend="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            nk.cosine_softmax(f, w, y, backend="cuda")


def test_cpu_backend_needs_cpu_tensors():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to build CUDA tensors")
    f, w, y = torch.randn(4, 5, device="cuda"), torch.randn(6, 5, device="cuda"), torch.arange(4)
    with pytest.raises(ValueError, match="CPU tensors"):
        nk.cosine_softmax(f, w, y.cuda(), backend="cpu")
