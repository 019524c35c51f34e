"""Step 2 and 3 of the AOT check: compile each unique configuration for a GPU target with
Triton's own compiler and check its registers, spills and shared memory."""

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

REGISTERS_PER_SM = 65536
SIXTEEN_BIT = ("fp16", "bf16")  # a spill in a kernel with these inputs fails the check


def _expand(launch):
    """(JITFunction, args, kwargs) for each configuration a launch can run: heuristics are
    evaluated, an autotuner contributes every one of its configs."""
    kernel, args, kwargs = launch.kernel, launch.args, dict(launch.kwargs)
    pending = [(kernel, kwargs)]
    done = []
    while pending:
        kernel, kwargs = pending.pop()
        kind = type(kernel).__name__
        if kind == "Heuristics":
            named = dict(zip(kernel.arg_names, args)) | kwargs
            extra = {name: fn(named) for name, fn in kernel.values.items()}
            pending.append((kernel.fn, kwargs | extra))
        elif kind == "Autotuner":
            for config in kernel.configs:
                options = {k: v for k, v in (("num_warps", config.num_warps),
                                             ("num_stages", config.num_stages),
                                             ("num_ctas", getattr(config, "num_ctas", None)),
                                             ("maxnreg", getattr(config, "maxnreg", None)))
                           if v is not None}
                pending.append((kernel.fn, kwargs | dict(config.kwargs) | options))
        else:
            done.append((kernel, args, kwargs))
    return done


def _specialize(fn, args, kwargs, backend):
    """The JIT's own binding: (key, signature, constexprs, attrs, options) as JITFunction.run
    computes them before compiling (triton 3.6 - 3.8)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = (fn.__module__, fn.__name__, str(specialization), str(sorted(
        (k, str(v)) for k, v in options.items() if k != "debug")))
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
                                                          specialization, options)
    return key, signature, constexprs, attrs, options


@dataclass
class Config:
    """One unique compile: kernel + specialization + options, and where it came from."""
    kernel: str
    fn: object
    args: tuple
    kwargs: dict
    key: tuple
    in_dtype: str
    constexprs: str
    num_warps: int
    num_stages: int
    pointers: str
    scenarios: list = field(default_factory=list)


def _short(value):
    text = str(value)
    return text.replace("triton.language.", "tl.").replace("torch.", "")


def _pointer_types(signature):
    """The pointer arguments' element types, e.g. 'bf16 bf16 fp32 i64' (two configurations of a
    kernel may differ only there)."""
    return " ".join(v.lstrip("*k") for v in signature.values()
                    if isinstance(v, str) and v.startswith("*"))


def _input_dtype(signature):
    """The kernel's input dtype: the first pointer argument's element type (f_ptr / x_ptr)."""
    for value in signature.values():
        if isinstance(value, str) and value.startswith("*"):
            return value.lstrip("*k")
    return "-"


def unique_configs(launches, target):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    configs = {}
    for launch in launches:
        for fn, args, kwargs in _expand(launch):
            key, signature, constexprs, attrs, options = _specialize(fn, args, kwargs, backend)
            if key not in configs:
                names = fn.arg_names
                shown = ", ".join(f"{names[k[0]] if isinstance(k, tuple) else k}="
                                  f"{_short(v)}" for k, v in constexprs.items())
                configs[key] = Config(fn.__name__, fn, args, kwargs, key,
                                      _input_dtype(signature), shown, options.num_warps,
                                      options.num_stages, _pointer_types(signature))
            if launch.scenario not in configs[key].scenarios:
                configs[key].scenarios.append(launch.scenario)
    return list(configs.values())


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def _parse_ptxas(log):
    regs = [int(m) for m in _PTXAS_USED.findall(log)]
    spills = _PTXAS_SPILL.findall(log)
    if not regs or not spills:
        return None
    stack, stores, loads = (max(int(s[i]) for s in spills) for i in range(3))
    return max(regs), stack, stores, loads


def _ptxas_report(ptx, capability):
    """ptxas -v of the PTX (when Triton's compile came from its cache, no log was written)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        run = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src,
                              "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
        return run.stderr


@dataclass
class Result:
    target: str
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    seconds: float = 0.0
    error: str = ""
    problems: list = field(default_factory=list)


def compile_one(config, target):
    """Compiles one configuration for `target` and measures it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    gpu = GPUTarget("cuda", target.capability, 32)
    backend = make_backend(gpu)
    result = Result(target.name)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        _, signature, constexprs, attrs, options = _specialize(config.fn, config.args,
                                                               config.kwargs, backend)
        src = ASTSource(config.fn, signature, constexprs, attrs)
        with knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=gpu, options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - a compile error is the finding
        result.seconds = time.perf_counter() - start
        result.error = f"{type(error).__name__}: {' '.join(str(error).split())[:400]}"
        return result
    result.seconds = time.perf_counter() - start
    parsed = _parse_ptxas(log.getvalue()) or _parse_ptxas(
        _ptxas_report(kernel.asm["ptx"], target.capability))
    if parsed is None:
        result.error = "no ptxas report"
        return result
    result.regs, result.stack, result.spill_stores, result.spill_loads = parsed
    result.shared = int(kernel.metadata.shared)
    result.problems = problems(result, config, target)
    return result


def problems(result, config, target):
    """What fails the check in a compiled configuration (spills outside 16-bit kernels are
    reported in the table but allowed: float32/float64 tiles are not meant for tensor cores)."""
    found = []
    threads = 32 * config.num_warps
    if result.shared > target.max_shared:
        found.append(f"shared {result.shared} B > {target.max_shared} B")
    if result.regs * threads > REGISTERS_PER_SM:
        found.append(f"{result.regs} regs x {threads} threads > {REGISTERS_PER_SM}")
    if config.in_dtype in SIXTEEN_BIT and (result.spill_stores or result.spill_loads):
        found.append("spills in a 16-bit kernel")
    return found


_WORK = []


def _compile_indexed(index):
    config, target = _WORK[index]
    return compile_one(config, target)


def compile_all(work, jobs):
    """Compiles [(config, target)] with `jobs` processes (forked: they inherit the recorded
    configs, which hold Triton functions that do not pickle)."""
    global _WORK
    _WORK = work
    if jobs <= 1 or len(work) <= 1:
        return [compile_one(c, t) for c, t in work]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_compile_indexed, range(len(work))))
