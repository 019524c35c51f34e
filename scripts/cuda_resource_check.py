"""Registers, stack frame, shared memory and spills of every CUDA kernel in normface_kernels._C,
for one architecture (sm_90 by default); fails on local memory (spills or a stack frame) in any
of them. Every kernel in the extension is ours (compiled from csrc/cuda), so no list of names.

Two sources, both read without a GPU:
  - the build's ptxas -v report (setup.py passes -Xptxas=-v; scripts/setup.sh keeps the output in
    build/normface-build.log): spill stores/loads in bytes, registers, static shared memory. An
    incremental build reports only the files it recompiled.
  - cuobjdump --dump-resource-usage of the built .so (CUDA_HOME's, else the one Triton ships):
    every kernel, always (REG, STACK, SHARED, LOCAL; a spill always shows as a stack frame).

    python scripts/cuda_resource_check.py [--so PATH] [--log build/normface-build.log] [--arch 90]

Exit 0: no local memory; 1: some kernel uses it, or the build has CUDA kernels but no report was
found; a CPU-only build (normface_kernels/_build_info.py says so) is skipped with its reason.
Known exceptions are listed, with the reason, in scripts/cuda_local_memory_allow.txt (--allow).
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_ARCH = re.compile(r"arch = sm_(\d+)a?")
_FUNCTION = re.compile(r"Function (\S+):")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_ptxas_log(text, arch):
    """{kernel: dict(regs, stack, spill_stores, spill_loads, smem)} for entry functions of arch."""
    kernels, current, props_of = {}, None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1) if int(m.group(2)) == arch else None
            if current:
                kernels.setdefault(current, {})
            props_of = None
        elif m := _PROPS.search(line):
            props_of = m.group(1)
        elif (m := _SPILL.search(line)) and current and props_of == current:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and current:
            kernels[current].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    return kernels


def parse_resource_usage(text, arch):
    """{kernel: dict(regs, stack, shared, local)} from cuobjdump --dump-resource-usage."""
    kernels, section, name = {}, None, None
    for line in text.splitlines():
        if m := _ARCH.search(line):
            section = int(m.group(1))
        elif m := _FUNCTION.search(line):
            name = m.group(1)
        elif (m := _USAGE.search(line)) and name and section == arch:
            kernels[name] = dict(regs=int(m.group(1)), stack=int(m.group(2)),
                                 shared=int(m.group(3)), local=int(m.group(4)))
    return kernels


def find_cuobjdump():
    home = os.environ.get("CUDA_HOME") or ""
    for candidate in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
    return bundled if os.path.exists(bundled) else None


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.splitlines())) if out.returncode == 0 else {
        n: n for n in names}


def read_allowlist(path):
    if not path or not os.path.exists(path):
        return []
    lines = [line.strip() for line in open(path)]
    return [re.compile(line) for line in lines if line and not line.startswith("#")]


def _short(name, width=90):
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", default=None, help="the extension (default: the in-place one)")
    parser.add_argument("--log", default=os.path.join(ROOT, "build", "normface-build.log"))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--build-info", default=os.path.join(ROOT, "normface_kernels",
                                                             "_build_info.py"))
    parser.add_argument("--allow", default=os.path.join(ROOT, "scripts",
                                                        "cuda_local_memory_allow.txt"),
                        help="file of regular expressions: kernels allowed local memory")
    args = parser.parse_args(argv)

    info = {}
    if os.path.exists(args.build_info):
        exec(open(args.build_info).read(), info)  # noqa: S102 - our own generated file
        if not info.get("CUDA"):
            print(f"cuda_resource_check: CPU-only build ({info.get('CUDA_SKIPPED_BECAUSE')}), "
                  "no CUDA kernels to check")
            return 0
    so = args.so or next(iter(sorted(glob.glob(os.path.join(ROOT, "normface_kernels",
                                                             "_C*.so")))), None)
    log = parse_ptxas_log(open(args.log).read(), args.arch) if os.path.exists(args.log) else {}
    usage = {}
    tool = find_cuobjdump()
    if so and tool:
        run = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True)
        if run.returncode == 0:
            usage = parse_resource_usage(run.stdout, args.arch)
        else:
            print(f"cuobjdump failed on {so}: {run.stderr.strip()[:300]}")
    if not usage and not log:
        print(f"cuda_resource_check: no sm_{args.arch} kernels found (extension {so}, cuobjdump "
              f"{tool}, log {args.log}): the CUDA build is missing or has no sm_{args.arch} code")
        return 1

    names = sorted(set(usage) | set(log))
    readable = demangle(names)
    allowed = read_allowlist(args.allow)
    used_patterns = set()
    failed, excused = [], []
    print(f"CUDA kernels of {os.path.relpath(so, ROOT) if so else '?'} for sm_{args.arch} "
          f"(ptxas -v from {'the build log' if log else 'no log'}, cuobjdump "
          f"{'yes' if usage else 'no'})")
    print(f"{'regs':>4} {'stack':>6} {'spill st/ld':>11} {'smem':>6} {'local':>6}  kernel")
    max_regs = 0
    for name in names:
        u, p = usage.get(name, {}), log.get(name, {})
        regs = u.get("regs", p.get("regs", 0))
        max_regs = max(max_regs, regs)
        stack = max(u.get("stack", 0), p.get("stack", 0))
        spills = (p.get("spill_stores", 0), p.get("spill_loads", 0))
        local = u.get("local", 0)
        smem = p.get("smem", u.get("shared", 0))  # cuobjdump adds the 1 KB the system reserves
        mark = ""
        if stack > 0 or local > 0 or any(spills):
            match = [pat for pat in allowed if pat.search(readable[name])]
            used_patterns.update(pat.pattern for pat in match)
            (excused if match else failed).append(readable[name])
            mark = "   <- local memory (allowed: listed)" if match else "   <- LOCAL MEMORY"
        spill_text = f"{spills[0]}/{spills[1]}" if p else "-"
        print(f"{regs:>4} {stack:>6} {spill_text:>11} {smem:>6} {local:>6}  "
              f"{_short(readable[name])}{mark}")
    print(f"{len(names)} kernels, max registers {max_regs}, {len(failed) + len(excused)} with "
          f"local memory (spills or a stack frame), {len(excused)} of them allowed by "
          f"{os.path.relpath(args.allow, ROOT) if allowed else 'no list'}")
    for pattern in allowed:
        if pattern.pattern not in used_patterns:
            print(f"stale allowlist entry (matches no kernel with local memory; remove it): "
                  f"{pattern.pattern}")
    if failed:
        print("cuda_resource_check FAILED: local memory in " + "; ".join(_short(f, 60)
                                                                  for f in failed))
        return 1
    print("cuda_resource_check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
