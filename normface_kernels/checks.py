"""Argument checks shared by the public API, the Triton ops and the distributed loss (contract "Bad
input"): each raises ValueError naming the argument, before any kernel runs.

This module sits below functional.py and triton/registration.py (both import it; it imports
neither). The C++ ops make the same checks in csrc/common.h.

Data checks: the checks that must read tensor data (label range, scale value, hardest range)
cost a host-device synchronization on CUDA tensors. `set_data_checks(False)` switches them off
for the Python and the C++ ops alike (on CUDA tensors only; CPU tensors are always checked, where
it costs nothing), so that a training step makes no synchronization and can be captured in a
CUDA graph. With them off, a label outside [0, C) is not detected: the kernels then treat it as a
target in another shard of the classes (never an out-of-bounds read).
"""

import math
import operator

import torch
from torch._subclasses.fake_tensor import is_fake

REDUCTIONS = ("mean", "sum", "none")

# The contract's constants ("Shapes and conventions"), for every backend: the eps inside the root
# of every norm, ||x|| = sqrt(sum x^2 + EPS), and the clamp of a cosine before arccos,
# theta = arccos(clamp(cos, -1 + COS_CLAMP, 1 - COS_CLAMP)). csrc/common.h has them for C++.
EPS = 1e-12
COS_CLAMP = 1e-7

# The switch of the data checks (read by data_checks_on; the C++ ops keep a copy, set together).
_DATA_CHECKS = True


def set_data_checks(enabled):
    """Switch the data-dependent checks (label range, scale value, hardest range) on or off for
    CUDA tensors. Returns the previous setting. On by default."""
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


def acc_dtype(dtype):
    """The accumulation dtype (contract "Shapes and conventions"): float32, or float64 for float64
    inputs; losses and lse come back in it."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def data_checks_on(*tensors):
    """Whether to run the data-dependent checks on these tensors: never while tracing; on CPU
    always; on other devices while switched on."""
    if tracing(*tensors):
        return False
    return _DATA_CHECKS or all(t.device.type == "cpu" for t in tensors)


def _data_checks(data, *tensors):
    """data_checks_on, and data=False (a backward op called by autograd: its forward checked the
    same values) skips them on accelerator tensors only -- CPU tensors are always checked, as in
    the C++ ops (csrc/common.h data_checks_on)."""
    if not data_checks_on(*tensors):
        return False
    return data or all(t.device.type == "cpu" for t in tensors)


def check_tensor(name, x, dim):
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != dim:
        shape = "(B, D)" if name == "features" else "(C, D)" if name == "weight" else "(B,)"
        raise ValueError(f"{name} must be {dim}-D {shape}, got shape {tuple(x.shape)}")


def check_device(name, t, features, *, cpu_number_ok=False):
    """`name` must live on the device of features. A meta tensor mixed with real ones is an error
    (the dispatcher would run a kernel on a tensor that has no data). cpu_number_ok: a CPU scalar
    (the scale) may sit next to accelerator features, never next to meta ones."""
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device == features.device:
        return
    if cpu_number_ok and t.device.type == "cpu" and features.device.type != "meta":
        return
    raise ValueError(f"{name} must be on the device of features ({features.device}), "
                     f"got {t.device}")


_NO_LABELS = object()


def check_inputs(features, weight, labels=_NO_LABELS):
    """features (B, D) floating, weight (C, D) same dtype and device, C > 0; with labels (even
    None, which is an error): labels (B,) integer on the same device, returned as int64."""
    check_tensor("features", features, 2)
    check_tensor("weight", weight, 2)
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating tensor, got {features.dtype}")
    if weight.dtype != features.dtype:
        raise ValueError(f"weight must have the dtype of features ({features.dtype}), "
                         f"got {weight.dtype}")
    check_device("weight", weight, features)
    if features.shape[1] != weight.shape[1]:
        raise ValueError(f"features and weight must have the same D, got features "
                         f"{tuple(features.shape)} and weight {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one class (C > 0), got shape "
                         f"{tuple(weight.shape)}")
    if labels is _NO_LABELS:
        return None
    check_tensor("labels", labels, 1)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have one entry per row of features, got labels "
                         f"{tuple(labels.shape)} and features {tuple(features.shape)}")
    check_device("labels", labels, features)
    return labels.long()


def check_reduction(reduction):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ---------------------------------------------------------------------------------------------
# Numbers: margins, hinge margins, eps, ignore_index, shards (always checked, no tensor data).
# ---------------------------------------------------------------------------------------------

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


def check_number(name, value):
    """A real Python number (int, float, numpy scalar; not bool, str or complex) as a float."""
    if isinstance(value, (bool, str, bytes, complex)) or torch.is_tensor(value):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def check_positive(name, value):
    """A real number, finite and > 0 (a scale, a floor), as a float."""
    value = check_number(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_finite(name, value):
    value = check_number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_margins(m1, m2, m3, lam):
    """Margins (contract): m1 >= 1 (psi is monotone on [0, pi] only then), m2, m3 finite, lam >= 0
    finite. Returns them as floats."""
    m1, m2, m3, lam = (check_finite(n, v) for n, v in (("m1", m1), ("m2", m2), ("m3", m3),
                                                       ("lam", lam)))
    if m1 < 1.0:
        raise ValueError(f"m1 must be >= 1, got {m1}")
    if lam < 0.0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return m1, m2, m3, lam


def check_eps(eps):
    """eps inside the root of a norm: finite and >= 0."""
    eps = check_finite("eps", eps)
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def check_int(name, value):
    """An integer argument of an op (ignore_index, class_start, num_classes): a Python int (or
    anything with __index__, not bool) in the int64 range. 1.5 is not silently truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def check_shard(class_start, num_classes, C):
    """Rows [class_start, class_start + C) of num_classes classes (-1 means C); returns n."""
    class_start = check_int("class_start", class_start)
    num_classes = check_int("num_classes", num_classes)
    if num_classes < -1:
        raise ValueError(f"num_classes must be -1 (meaning C) or >= C = {C}, got {num_classes}")
    n = C if num_classes < 0 else num_classes
    if not (class_start >= 0 and class_start + C <= n):
        raise ValueError(f"class_start/num_classes must describe a shard of the classes, got "
                         f"class_start {class_start}, num_classes {n} for C = {C}")
    return n


# ---------------------------------------------------------------------------------------------
# Data: label range and scale value (one host sync on CUDA tensors, see set_data_checks).
# ---------------------------------------------------------------------------------------------

def check_labels_range(labels, num_classes, ignore_index):
    """The reference backend's own label check (the C++ ops check inside the op); nothing to
    read while tracing (meta or fake tensors)."""
    if tracing(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, {num_classes}) or equal ignore_index "
                         f"({ignore_index}); got {int(labels[bad][0])}")


def _bad_scale(scale):
    """A 0-dim bool tensor: the scale is not finite and > 0."""
    s = scale.detach().reshape(())
    return ~(torch.isfinite(s) & (s > 0))


def _scale_error(scale):
    return ValueError(f"scale must be finite and > 0, got {float(scale)}")


def check_scale_value(scale):
    """Data check of a tensor scale (finite, > 0), skipped while tracing or switched off."""
    if data_checks_on(scale) and bool(_bad_scale(scale)):
        raise _scale_error(scale)


def check_scale_tensor(scale, features):
    """Metadata of a scale tensor: one floating number on features' device (or a CPU number
    next to accelerator features)."""
    if not torch.is_tensor(scale):
        raise ValueError(f"scale must be a 0-dim tensor, got {type(scale).__name__}")
    if scale.numel() != 1:
        raise ValueError(f"scale must be a number or a 0-dim tensor, got shape "
                         f"{tuple(scale.shape)}")
    if not scale.is_floating_point():
        raise ValueError(f"scale must be floating, got {scale.dtype}")
    check_device("scale", scale, features, cpu_number_ok=True)


def scale_tensor(scale, features):
    """A float scale (finite, > 0) becomes a 0-dim tensor on features' device, by a fill on the
    device (torch.tensor(value, device=...) would copy it from pageable host memory: not allowed
    while a CUDA graph is captured); a tensor is checked (metadata only: its value is checked by
    the op, or check_scale_value) and kept."""
    acc = acc_dtype(features.dtype)
    if torch.is_tensor(scale):
        check_scale_tensor(scale, features)
        return scale.reshape(())
    value = check_positive("scale", scale)
    return torch.full((), value, dtype=acc, device=features.device)


_NO_SCALE = object()


def check_op_inputs(features, weight, labels, ignore_index, class_start, num_classes,
                    scale=_NO_SCALE, data=True):
    """The checks of a loss op called directly (torch.ops.normface.triton_*, and the fake
    kernels of the C++ ops): the public API's shape/dtype/device checks, the op's stricter int64
    labels, the integer and shard arguments, and the data checks (one host sync for labels and
    scale together, skipped while tracing or switched off, and with data=False on accelerator
    tensors: a backward op, whose forward checked the same labels, makes no sync of its own)."""
    check_inputs(features, weight, labels)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    ignore_index = check_int("ignore_index", ignore_index)
    n = check_shard(class_start, num_classes, weight.shape[0])
    has_scale = scale is not _NO_SCALE  # the softmax ops (None there is an error)
    if has_scale:
        check_scale_tensor(scale, features)
    if not _data_checks(data, features, weight, labels, *((scale,) if has_scale else ())):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n))
    flags = [bad.any()]
    if has_scale:
        flags.append(_bad_scale(scale).to(bad.device))
    bad_labels, *bad_scale = torch.stack(flags).tolist()
    if bad_labels:
        raise ValueError(f"labels must be in [0, {n}) or equal ignore_index ({ignore_index}); "
                         f"got {int(labels[bad][0])}")
    if bad_scale and bad_scale[0]:
        raise _scale_error(scale)


def check_per_sample(name, t, features):
    """A per-sample tensor of a backward op (grad_loss, grad_lse, lse): floating (B,)."""
    if not torch.is_tensor(t):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    check_device(name, t, features)
    if t.dim() != 1 or t.shape[0] != features.shape[0]:
        raise ValueError(f"{name} must have shape (B,) = ({features.shape[0]},), got "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating, got {t.dtype}")


def check_hardest(hardest, features, weight, data=True):
    """c_triplet's hardest (B,) int64 in [-1, C) (the range is a data check; data=False: a
    backward op called by autograd, whose forward produced hardest, skips it off the CPU)."""
    if not torch.is_tensor(hardest):
        raise ValueError(f"hardest must be a tensor, got {type(hardest).__name__}")
    check_device("hardest", hardest, features)
    if hardest.dim() != 1 or hardest.shape[0] != features.shape[0]:
        raise ValueError(f"hardest must have shape (B,) = ({features.shape[0]},), got "
                         f"{tuple(hardest.shape)}")
    if hardest.dtype != torch.int64:
        raise ValueError(f"hardest must be int64, got {hardest.dtype}")
    C = weight.shape[0]
    if hardest.numel() > 0 and _data_checks(data, hardest):
        if bool(((hardest < -1) | (hardest >= C)).any()):
            raise ValueError(f"hardest must be in [-1, {C}), got values outside")


def check_normalize_inputs(x, eps, grad=None):
    """l2_normalize (and its backward): x floating with at least one dim, eps; grad like x."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got "
                         f"{x.dtype if torch.is_tensor(x) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim, got a 0-dim tensor")
    eps = check_eps(eps)
    if grad is not None:
        if not torch.is_tensor(grad) or not grad.is_floating_point():
            raise ValueError("grad must be a floating tensor")
        if grad.device != x.device:
            raise ValueError(f"grad must be on the device of x ({x.device}), got {grad.device}")
        if grad.shape != x.shape:
            raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(grad.shape)}")
    return eps


def check_logits_inputs(features, weight, scale, eps):
    """cosine_logits called directly: the pair, one scale tensor (value checked), eps."""
    check_inputs(features, weight)
    check_scale_tensor(scale, features)
    check_scale_value(scale)
    return check_eps(eps)
