"""Builds normface_kernels._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit is
usable.

Whether CUDA sources are compiled is decided by the toolkit (CUDA_HOME with a working nvcc) and by
the switch NORMFACE_NO_CUDA=1 -- never by whether a GPU is visible, so a GPU-less build machine
still ships the CUDA kernels. TORCH_CUDA_ARCH_LIST picks the architectures (default below).
ptxas reports every kernel's registers, stack frame and spills (-Xptxas=-v) into the build output;
scripts/setup.sh keeps it in build/normface-build.log and scripts/cuda_resource_check.py reads it.
How the extension was built is written to normface_kernels/_build_info.py (not tracked).

    pip install --no-build-isolation -e .                 # or, incrementally (scripts/setup.sh):
    python setup.py build_ext --inplace
NORMFACE_SKIP_EXTENSION=1 installs the Python package alone (setup.sh then builds in place).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _find_cuda_home():
    """CUDA_HOME if set, else the directory of the real nvcc (not a wrapper in /usr/local/bin)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        for candidate in sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]:
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                home = candidate
                break
    if not home:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    return None


def _pip_cuda_include_dirs():
    """Headers that ATen's CUDA headers include (cublas, cusparse) ship in torch's pip deps."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _write_build_info(cuda, why_not, torch_version):
    """normface_kernels/_build_info.py: whether csrc/cuda was compiled and, if not, why -- so the
    tests can tell a deliberate CPU-only build (skip) from a CUDA build that went missing (fail)."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else ""
    with open(os.path.join(HERE, "normface_kernels", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py when normface_kernels._C is built (not tracked).\n"
                f"CUDA = {cuda!r}\nCUDA_SKIPPED_BECAUSE = {why_not!r}\n"
                f"TORCH_CUDA_ARCH_LIST = {arch!r}\nTORCH = {torch_version!r}\n")


def _extensions():
    if os.environ.get("NORMFACE_SKIP_EXTENSION", "0") == "1":
        return []
    import torch
    from torch.utils import cpp_extension

    sources = [os.path.join("csrc", "registration.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "chunked", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    no_cuda_switch = os.environ.get("NORMFACE_NO_CUDA", "0") == "1"
    want_cuda = not no_cuda_switch and torch.version.cuda is not None
    cuda_home = _find_cuda_home() if want_cuda else None
    use_cuda = bool(want_cuda and cuda_home and cuda_sources)
    why_not = ("" if use_cuda else "NORMFACE_NO_CUDA=1" if no_cuda_switch
               else "CPU-only torch" if torch.version.cuda is None
               else "no CUDA toolkit" if not cuda_home else "no CUDA sources")

    # -ffp-contract=off: no a * b + c fused into an FMA behind our back. The backward recomputes
    # each logit and must get it bit-identical to the forward (contract "Bad input"); GCC contracts
    # by default in the FMA-capable target_clones, differently in the two passes.
    cxx_flags = ["-O3", "-ffp-contract=off", "-DNORMFACE_PYTHON_MODULE"]
    if sys.platform != "win32":
        cxx_flags.append("-fopenmp")
    include_dirs = [os.path.join(HERE, "csrc")]
    extra = {"cxx": cxx_flags}
    if use_cuda:
        # cpp_extension reads CUDA_HOME at import time: set it before building.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        include_dirs += _pip_cuda_include_dirs()
        # -Xptxas=-v: registers, stack frame and spill bytes of every kernel, per architecture.
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v",
                         "-DNORMFACE_PYTHON_MODULE"]
        extra["cxx"] = cxx_flags + ["-DNORMFACE_WITH_CUDA"]
        extra["nvcc"].append("-DNORMFACE_WITH_CUDA")
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        print(f"normface_kernels: building CUDA kernels with {cuda_home} "
              f"for arch {os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext_cls = cpp_extension.CppExtension
        print("normface_kernels: building CPU kernels only"
              + ("" if want_cuda else " (NORMFACE_NO_CUDA=1 or a CPU-only torch)"))

    _write_build_info(use_cuda, why_not, torch.__version__)
    return [ext_cls("normface_kernels._C", sources, include_dirs=include_dirs,
                    extra_compile_args=extra, extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["normface_kernels", "normface_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
