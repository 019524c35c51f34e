"""Argument checks shared by the public API, the Triton ops and the distributed loss (SPEC "Bad
input"): each raises ValueError naming the argument, before any kernel runs.

This module sits below functional.py and triton/registration.py (both import it; it imports
neither). The C++ ops make the same checks in csrc/common.h.

Data checks: the checks that must read tensor data (label range, finite scale) cost a
host-device synchronization on CUDA tensors. `set_data_checks(False)` switches them off for the
Python and the C++ ops alike (on CUDA tensors only; CPU tensors are always checked, where it
costs nothing), so that a training step makes no synchronization and can be captured in a CUDA
graph. With them off, a label outside [0, C) is not detected: the kernels then treat it as a
target in another shard of the classes (never an out-of-bounds read).
"""

import math

import torch
from torch._subclasses.fake_tensor import is_fake

REDUCTIONS = ("mean", "sum", "none")

# The switch of the data checks (read by data_checks_on; the C++ ops keep a copy, set together).
_DATA_CHECKS = True


def set_data_checks(enabled):
    """Switch the data-dependent checks (label range, finite scale) on or off for CUDA tensors.
    Returns the previous setting. On by default."""
    global _DATA_CHECKS
    previous, _DATA_CHECKS = _DATA_CHECKS, bool(enabled)
    if hasattr(torch.ops.normface, "set_data_checks"):
        torch.ops.normface.set_data_checks(_DATA_CHECKS)
    return previous


def data_checks_enabled():
    """True while the data-dependent checks are on (the default)."""
    return _DATA_CHECKS


def tracing(*tensors):
    """True under torch.compile / opcheck tracing (fake or meta tensors): there is no data to
    check."""
    if torch._guards.detect_fake_mode() is not None:
        return True
    return any(is_fake(t) or t.device.type == "meta" for t in tensors)


def data_checks_on(*tensors):
    """Whether to run the data-dependent checks on these tensors: never while tracing; on CPU
    always; on other devices while switched on."""
    if tracing(*tensors):
        return False
    return _DATA_CHECKS or all(t.device.type == "cpu" for t in tensors)


def check_tensor(name, x, dim):
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != dim:
        shape = "(B, D)" if name == "features" else "(C, D)" if name == "weight" else "(B,)"
        raise ValueError(f"{name} must be {dim}-D {shape}, got shape {tuple(x.shape)}")


def check_inputs(features, weight, labels=None):
    check_tensor("features", features, 2)
    check_tensor("weight", weight, 2)
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating tensor, got {features.dtype}")
    if weight.dtype != features.dtype:
        raise ValueError(f"weight must have the dtype of features ({features.dtype}), "
                         f"got {weight.dtype}")
    if weight.device != features.device:
        raise ValueError(f"weight must be on the device of features ({features.device}), "
                         f"got {weight.device}")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(f"features and weight must have the same D, got features "
                         f"{tuple(features.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (C > 0), got shape "
                         f"{tuple(weight.shape)}")
    if labels is None:
        return None
    check_tensor("labels", labels, 1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have one entry per row of features, got labels "
                         f"{tuple(labels.shape)} and features {tuple(features.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels must be on the device of features ({features.device}), "
                         f"got {labels.device}")
    return labels.long()


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_labels_range(labels, num_classes, ignore_index):
    """The reference backend's own label check (the C++ ops check inside the op)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or equal ignore_index "
                         f"({ignore_index}); got {int(labels[bad][0])}")


def scale_tensor(scale, features):
    """A float scale becomes a 0-dim tensor on features' device; a tensor is checked and kept."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    if torch.is_tensor(scale):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 0-dim tensor, got shape "
                             f"{tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise ValueError(f"scale must be floating, got {scale.dtype}")
        return scale.reshape(())
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a float or a 0-dim tensor, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return torch.tensor(float(scale), dtype=acc, device=features.device)


def check_finite(name, value):
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    scale=None, data=True):
    """The checks of a loss op called directly (torch.ops.normface.triton_*): the public API's
    shape/dtype/device checks, the op's stricter int64 labels, the shard arguments, and the data
    checks (one host sync for both, skipped while tracing or switched off, and with data=False:
    a backward op, whose forward checked the same labels, makes no sync of its own)."""
    check_inputs(features, weight, labels)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    C = weight.shape[0]
    n = C if num_classes < 0 else num_classes
    if not (class_start >= 0 and class_start + C <= n):
        raise ValueError(f"class_start/num_classes must describe a shard of the classes, got "
                         f"class_start {class_start}, num_classes {n} for weight "
                         f"{tuple(weight.shape)}")
    if scale is not None:
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a floating 0-dim tensor, got {scale.dtype} of "
                             f"shape {tuple(scale.shape)}")
        if scale.device != features.device and scale.device.type != "cpu":
            raise ValueError(f"scale must be on the device of features ({features.device}), "
                             f"got {scale.device}")
    if not data or not data_checks_on(features, weight, labels,
                                      *(() if scale is None else (scale,))):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n))
    flags = [bad.any()]
    if scale is not None:
        flags.append(~torch.isfinite(scale.detach().reshape(())).to(bad.device))
    bad_labels, *bad_scale = torch.stack(flags).tolist()
    if bad_labels:
        raise ValueError(f"labels must be in [0, {n}) or equal ignore_index ({ignore_index}); "
                         f"got {int(labels[bad][0])}")
    if bad_scale and bad_scale[0]:
        raise ValueError(f"scale must be finite, got {float(scale)}")


def check_per_sample(name, t, features):
    if t.dim() != 1 or t.shape[0] != features.shape[0]:
        raise ValueError(f"{name} must have shape (B,) = ({features.shape[0]},), got "
                         f"{tuple(t.shape)}")
