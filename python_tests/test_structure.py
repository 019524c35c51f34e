"""The package's structure: one schema table equal to what C++ registers, no import cycle, the
modules at the bottom import nothing above them, and asking for a backend has no side effect."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import normface_kernels as nk
from normface_kernels import backends, schemas

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "normface_kernels"


def test_schema_table_is_what_cpp_registers():
    for name, schema in schemas.CPP.items():
        registered = getattr(torch.ops.normface, name).default._schema
        assert registered == schemas.parse(name, schema), (name, str(registered), schema)


def test_cpp_registers_nothing_outside_the_table():
    ours = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("normface::") and not n.startswith("normface::triton_")}
    assert ours == set(schemas.CPP)


def test_signature_rejects_a_body_that_drifted():
    def body(x, epsilon):
        return x
    with pytest.raises(TypeError, match="schema"):
        schemas.signature("l2_normalize", schemas.CPP["l2_normalize"], body)


def _imports():
    """module -> the package modules it imports, at module level or inside a function."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] \
                    if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found = ([module] if node.module else []) + [f"{module}.{a.name}"
                                                             for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            deps |= {m for m in found if m in modules and m != name}
        graph[name] = deps
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_cycle():
    graph = _imports()
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("module, allowed", [
    ("normface_kernels.checks", set()),
    ("normface_kernels.schemas", set()),
    ("normface_kernels.reference", {"normface_kernels.checks"}),
    # The registry loads the C++ library and, on first use, the Triton ops: nothing else.
    ("normface_kernels.backends", {"normface_kernels._C", "normface_kernels.triton"}),
])
def test_bottom_modules_import_nothing_above_them(module, allowed):
    assert _imports()[module] <= allowed


def test_backend_predicates_have_no_side_effect():
    code = ("import torch, normface_kernels as nk\n"
            "nk.has_triton(); nk.has_cuda_kernels(); nk.backends.REGISTRY['triton'].available()\n"
            "import sys\n"
            "assert 'normface_kernels.triton' not in sys.modules\n"
            "assert not hasattr(torch.ops.normface, 'triton_l2_normalize')\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr


_FIRST_USE_COMPILED = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch, normface_kernels as nk
assert "normface_kernels.triton" not in sys.modules
g = torch.Generator().manual_seed(0)
f = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
w = torch.randn(7, 8, generator=g, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 7, (5,), generator=g)
step = torch.compile(lambda f, w, y: nk.cosine_softmax(f, w, y, 10.0, m2=0.3, backend="triton"),
                     fullgraph=True, backend="aot_eager")
loss = step(f, w, y)
ref = nk.cosine_softmax(f, w, y, 10.0, m2=0.3, backend="reference")
torch.testing.assert_close(loss, ref)
torch.testing.assert_close(torch.autograd.grad(loss, (f, w)), torch.autograd.grad(ref, (f, w)))
print("ok")
"""


@pytest.mark.skipif(not nk.has_triton(), reason="triton is not installed")
def test_first_use_of_triton_inside_torch_compile():
    """The Triton ops are defined on first use; when that use is a compiled step
    (fullgraph=True), the load must be traceable. A fresh process: the test suite itself loads
    them up front (conftest)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _FIRST_USE_COMPILED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr[-3000:]


def test_registry_drives_backend_names_and_errors():
    assert nk.BACKENDS == ("auto",) + tuple(backends.REGISTRY)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve("tpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors, got features on meta"):
        backends.resolve("cpu", torch.device("meta"))
    if not nk.has_cuda_kernels():
        with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*without CUDA"):
            backends.resolve("cuda", torch.device("cpu"))


def test_auto_picks_the_first_loaded_backend_that_accepts_the_device():
    cpu = backends.resolve("auto", torch.device("cpu"))
    assert cpu.name == ("cpu" if backends.CPP_ERROR is None else "reference")
    meta = backends.resolve("auto", torch.device("meta"))
    assert meta.name == "reference"
