"""The chunked path (csrc/chunked) on CPU tensors: the orchestration backend="cuda" runs, here with
its CPU epilogues (set_cpu_path("chunked")), against the reference.

The scenarios every backend shares (test_cosine_softmax, test_agent_losses: every contract
setting, every agent loss and reduction, shards, gradcheck, float32/16-bit tolerance, NaN, ignored
rows holding NaN, huge norms, float16 gradients below the subnormal range, non-contiguous inputs)
run on it as conftest's `backend` "cpu_chunked", with a small chunk budget so that every call
walks several chunks; test_ops_registration's tests (opcheck, torch.compile) run again here. The
tests written below add what is particular to the chunked path: chunk boundaries, the chunk width,
the switches.
"""

import pytest
import torch
from conftest import AGENT_CASES, SMALL_BUDGET, SPEC_SETTINGS, budget_for, grads, make_inputs
from test_ops_registration import *  # noqa: F401,F403  (re-run on the chunked path)

import normface_kernels as nk
from normface_kernels import reference
from normface_kernels.chunking import chunk_budget, cpu_path

ops = torch.ops.normface


@pytest.fixture(autouse=True)
def _chunked_cpu():
    with cpu_path("chunked"), chunk_budget(SMALL_BUDGET):
        yield


def test_switches_return_the_previous_setting():
    assert nk.set_cpu_path("chunked") == "chunked"
    assert nk.set_cpu_path("blocked") == "chunked"
    assert nk.set_cpu_path("chunked") == "blocked"
    assert nk.set_chunk_budget(123) == SMALL_BUDGET
    assert nk.set_chunk_budget(SMALL_BUDGET) == 123
    with pytest.raises(ValueError, match="path"):
        nk.set_cpu_path("tiled")
    with pytest.raises(ValueError, match="nbytes"):
        nk.set_chunk_budget(-1)
    with pytest.raises(ValueError, match="path"):
        ops.set_cpu_path("tiled")


def test_the_chunked_kernels_are_the_ones_that_run():
    table = torch._C._dispatch_dump_table("normface::cosine_softmax_forward")
    cpu = [line for line in table.splitlines() if line.startswith("CPU")]
    assert cpu and "chunked" in cpu[0]
    with cpu_path("blocked"):
        table = torch._C._dispatch_dump_table("normface::cosine_softmax_forward")
        cpu = [line for line in table.splitlines() if line.startswith("CPU")]
        assert cpu and "chunked" not in cpu[0]


# ---------------------------------------------------------------------------------------------
# Chunk boundaries: one class per chunk, a few, a partial last chunk, one chunk; C = 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [1, 3, 7, 1000])
@pytest.mark.parametrize("C", [1, 2, 17])
def test_chunk_boundaries(classes, C):
    B, D = 5, 4
    f, w, y = make_inputs(B, C, D, ignore=(1,), seed=C)
    setting = dict(SPEC_SETTINGS["combined_margins"])
    s = torch.tensor(setting.pop("scale"), dtype=torch.float64, requires_grad=True)
    with chunk_budget(budget_for(classes, B, D)):
        loss, g = grads(lambda: nk.cosine_softmax(f, w, y, s, reduction="none", **setting),
                        f, w, s)
        for name, (ours, _, kwargs) in AGENT_CASES.items():
            a_loss, a_g = grads(lambda: ours(f, w, y, reduction="none", **kwargs), f, w)
            e_loss, e_g = grads(lambda: AGENT_CASES[name][1](f, w, y, **kwargs), f, w)
            torch.testing.assert_close(a_loss, e_loss, rtol=1e-9, atol=1e-10)
            for a, b in zip(a_g, e_g):
                torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    s_ref = s.detach().clone().requires_grad_()
    e_loss, e_g = grads(lambda: reference.cosine_softmax(f, w, y, s_ref, **setting), f, w, s_ref)
    torch.testing.assert_close(loss, e_loss, rtol=1e-9, atol=1e-10)
    for a, b in zip(g, e_g):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_results_do_not_depend_on_the_chunk_width():
    """Many chunks or one: the same losses and gradients up to rounding (float64)."""
    f, w, y = make_inputs(6, 40, 8, ignore=(0,))
    with chunk_budget(budget_for(5, 6, 8)):
        loss, g = grads(lambda: nk.cosine_softmax(f, w, y, 20.0, m2=0.4, reduction="none"), f, w)
    with chunk_budget(budget_for(40, 6, 8)):
        loss1, g1 = grads(lambda: nk.cosine_softmax(f, w, y, 20.0, m2=0.4, reduction="none"),
                          f, w)
    torch.testing.assert_close(loss, loss1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
