"""The backends of normface_kernels, one registry entry each (docs/contract.md "Backends").

A backend is a set of ops `torch.ops.normface.<prefix><name>` with the same schemas and meaning
(normface_kernels/schemas.py), plus "reference", the plain PyTorch formulas of reference.py. An
entry says where its ops come from, whether they can run here (and why not), and which devices
it accepts. `BACKENDS`, backend="auto", the benchmark's list of our backends and the errors of an
unavailable backend all derive from `REGISTRY`. Adding a backend: its ops, and one entry.

Asking whether a backend is available has no side effect: the Triton ops are defined (a module
import) only when a call first selects backend "triton" (`Backend.load`).

This module sits below the public API (functional.py, modules.py); from the package it imports
only the C++ library, whose load it records, and, on first use, the Triton ops.
"""

import dataclasses
import importlib.util
import os
from typing import Callable, Optional, Tuple

import torch

# The C++ library registers every op schema and the CPU (and, when built, CUDA) kernels. A
# failed load leaves "reference" (and "triton") usable, and says why on use.
try:
    from . import _C  # noqa: F401
    CPP_ERROR = None
except ImportError as error:  # pragma: no cover - exercised only on broken installs
    CPP_ERROR = error


def _cpp_status():
    if CPP_ERROR is None:
        return True, None
    return False, f"normface_kernels._C did not load ({CPP_ERROR})"


def _cuda_status():
    ok, why = _cpp_status()
    if not ok:
        return ok, why
    if not torch._C._dispatch_has_kernel_for_dispatch_key("normface::cosine_softmax_forward",
                                                          "CUDA"):
        return False, ("normface_kernels._C was built without CUDA kernels (no CUDA toolkit at "
                       "build time, or NORMFACE_NO_CUDA=1)")
    return True, None


def _triton_status():
    """A `triton` module is installed (whichever distribution ships it: triton, pytorch-triton,
    ...); nothing is imported. Its version is checked when the backend loads
    (normface_kernels/triton/__init__.py)."""
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    return True, None


def _load_triton_ops():
    # A plain import statement, not importlib.import_module: torch.compile traces the former
    # when a compiled step is the first to use the backend, and refuses the latter.
    from . import triton  # noqa: F401


def triton_interpreted():
    """TRITON_INTERPRET=1: Triton kernels run in its interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    op_prefix: Optional[str]                 # its ops are torch.ops.normface.<prefix><op>; None:
    #                                          the reference, plain PyTorch functions
    devices: str                             # in words, for the error of a wrong device
    accepts: Callable[[torch.device], bool]  # whether it runs on tensors of this device
    status: Callable[[], Tuple[bool, Optional[str]]]  # (can run here, why not), no side effect
    loader: Optional[Callable[[], None]] = None  # run on first use: defines the ops
    variants: Tuple[str, ...] = ()           # benchmark rows of the same ops on another path

    def checked(self):
        """(available, why not), found once, when this module is imported (the installation does
        not change): a call traced by torch.compile reads a dict instead of tracing into
        importlib, which dynamo refuses."""
        return _STATUS[self.name]

    def available(self):
        """Whether the backend can run here (no side effect)."""
        return self.checked()[0]

    def unavailable_reason(self):
        return self.checked()[1]

    def load(self):
        """(ok, why not): the status, then the import that defines the ops, once. A module that
        fails to import (a kernel that does not define, an op that does not register) makes the
        backend unavailable with its reason rather than raising on every call of "auto"."""
        ok, why = self.checked()
        if not ok or self.loader is None:
            return ok, why
        if self.name not in _LOADED:
            try:
                self.loader()
            except Exception as error:  # noqa: BLE001 - any import/registration failure
                _LOADED[self.name] = (False, f"its ops failed to load "
                                             f"({type(error).__name__}: {error})")
            else:
                _LOADED[self.name] = (True, None)
        return _LOADED[self.name]

    def require(self):
        """load(), raising RuntimeError with the reason when the backend cannot run here."""
        ok, why = self.load()
        if not ok:
            raise RuntimeError(f"backend={self.name!r} is not available: {why}")
        return self

    def op(self, name):
        """The op `name` of this backend (torch.ops.normface.<prefix><name>)."""
        return getattr(torch.ops.normface, self.op_prefix + name)


# Results of Backend.load: a module-level dict rather than functools.lru_cache, which
# torch.compile would trace through with a warning.
_LOADED = {}

REGISTRY = {b.name: b for b in (
    Backend("reference", None, "tensors on any device", lambda device: True,
            lambda: (True, None)),
    Backend("cpu", "", "CPU tensors", lambda device: device.type == "cpu", _cpp_status,
            variants=("cpu_chunked",)),
    Backend("triton", "triton_", "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)",
            lambda device: device.type == "cuda" or (device.type == "cpu"
                                                     and triton_interpreted()),
            _triton_status, loader=_load_triton_ops),
    Backend("cuda", "", "CUDA tensors", lambda device: device.type == "cuda", _cuda_status),
)}

# Every backend's (available, why not), read once here (Backend.checked): no side effect.
_STATUS = {name: backend.status() for name, backend in REGISTRY.items()}

BACKENDS = ("auto",) + tuple(REGISTRY)

# What "auto" picks, per device type: the first that accepts the tensors and loads. On CUDA,
# Triton first: its kernels are also exercised in CI (interpreter); the GPU benchmark decides.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def get(name):
    """The registry entry of a backend name (not "auto")."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return REGISTRY[name]


def resolve(name, device):
    """The concrete backend for tensors on `device`, loaded; raises naming what is missing:
    ValueError for a name that is not a backend or a device it does not accept, RuntimeError for
    a backend that cannot run here."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            backend = REGISTRY[candidate]
            if backend.accepts(device) and backend.load()[0]:
                return backend
        return REGISTRY["reference"]
    backend = get(name).require()
    if not backend.accepts(device):
        raise ValueError(f"backend={name!r} needs {backend.devices}, got features on {device}")
    return backend


def has_cuda_kernels():
    """True when normface_kernels._C was built with the CUDA kernels (csrc/cuda)."""
    return REGISTRY["cuda"].available()


def has_triton():
    """True when a triton module is installed (nothing is imported: the Triton ops are defined,
    and triton's version checked, on first use; a failure there is the error of
    backend="triton")."""
    return REGISTRY["triton"].available()


def load_triton():
    """Define the Triton ops (torch.ops.normface.triton_*) now; raises RuntimeError why not."""
    REGISTRY["triton"].require()
