"""SPEC "Bad input": every case raises ValueError/RuntimeError naming the argument."""

import math

import pytest
import torch
from conftest import make_inputs

import normface_kernels as nk

LOSSES = {
    "cosine_softmax": nk.cosine_softmax,
    "c_contrastive": nk.c_contrastive,
    "c_triplet": nk.c_triplet,
    "center_loss": nk.center_loss,
}


def _cases():
    f, w, y = make_inputs(4, 6, 5, dtype=torch.float32, requires_grad=False)
    return {
        "features_rank": ((f[0], w, y), "features"),
        "weight_rank": ((f, w[None], y), "weight"),
        "labels_rank": ((f, w, y[:, None]), "labels"),
        "mismatched_D": ((f, w[:, :4], y), "same D"),
        "mismatched_B": ((f, w, y[:3]), "labels"),
        "float_labels": ((f, w, y.float()), "labels"),
        "label_too_large": ((f, w, torch.tensor([0, 1, 6, 2])), "labels"),
        "label_negative": ((f, w, torch.tensor([0, -1, 3, 2])), "labels"),
        "no_classes": ((f, w[:0], y), "weight"),
        "mismatched_dtype": ((f, w.double(), y), "weight"),
        "integer_features": ((f.long(), w.long(), y), "features"),
    }


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("case", sorted(_cases()))
def test_bad_input_raises_naming_the_argument(loss, case, backend):
    args, word = _cases()[case]
    with pytest.raises((ValueError, RuntimeError), match=word):
        LOSSES[loss](*args, backend=backend)


@pytest.mark.parametrize("op, extra", [
    ("cosine_softmax", ()),
    ("c_contrastive", ()),
    ("center_loss", ()),
    ("c_triplet", ()),
])
@pytest.mark.parametrize("case", ["label_too_large", "mismatched_D", "features_rank",
                                  "no_classes", "float_labels"])
def test_ops_check_their_arguments_too(op, extra, case):
    """Calling torch.ops.normface.* directly also raises a clear error, never crashes."""
    (f, w, y), word = _cases()[case]
    args = (f, w, y) + ((torch.tensor(10.0),) if op == "cosine_softmax" else ())
    with pytest.raises(RuntimeError, match=word if word != "same D" else "same D"):
        getattr(torch.ops.normface, op)(*args)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_non_finite_scale(backend, scale):
    f, w, y = make_inputs(4, 6, 5, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="scale"):
        nk.cosine_softmax(f, w, y, scale, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        nk.cosine_softmax(f, w, y, torch.tensor(scale), backend=backend)


def test_bad_options():
    f, w, y = make_inputs(4, 6, 5, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="reduction"):
        nk.cosine_softmax(f, w, y, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        nk.cosine_softmax(f, w, y, backend="tpu")
    with pytest.raises(ValueError, match="m2"):
        nk.cosine_softmax(f, w, y, m2=math.nan)
    with pytest.raises(ValueError, match="loss"):
        nk.NormFaceLoss(5, 6, loss="hinge")
    with pytest.raises(ValueError, match="scale"):
        nk.NormFaceLoss(5, 6, scale=math.inf)


def test_unavailable_backend_says_what_is_missing():
    f, w, y = make_inputs(4, 6, 5, dtype=torch.float32, requires_grad=False)
    if not nk.has_cuda_kernels():
        with pytest.raises(RuntimeError, match="without CUDA kernels"):
            nk.cosine_softmax(f, w, y, backend="cuda")
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            nk.cosine_softmax(f, w, y, backend="cuda")


def test_cpu_backend_needs_cpu_tensors():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to build CUDA tensors")
    f, w, y = make_inputs(4, 6, 5, dtype=torch.float32, requires_grad=False, device="cuda")
    with pytest.raises(ValueError, match="CPU tensors"):
        nk.cosine_softmax(f, w, y, backend="cpu")
