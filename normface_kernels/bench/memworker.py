"""CPU extra-peak-memory measurement in a separate process (see measure.py for the method).

The benchmark process sends a JSON list of jobs on stdin, one per (case, backend) with the
passes to measure; this process answers one JSON line per pass as it goes. Inputs are rebuilt
from the same seed, so they are the inputs the timing used. Where this kernel cannot reset
VmHWM, each pass runs in a fresh child process instead and ru_maxrss measures it.

    python -m normface_kernels.bench.memworker < jobs.json
"""

import json
import os
import subprocess
import sys

import torch

from . import measure
from .grid import Case
from .runners import Inputs, make_runner, pass_steps


def _case(job):
    return Case(job["op"], job["B"], job["D"], job["C"], job["dtype"], tuple(job["passes"]))


def _warm(job, warmed):
    """Load code and pools before measuring: a tiny shape of the same op and backend, or, for
    torch.compile (which compiles per shape), the real shape, freed again before the reset."""
    if job["backend"] == "torch_compile":
        case = _case(job)
    else:
        key = (job["op"], job["backend"], job["dtype"])
        if key in warmed:
            return
        warmed.add(key)
        case = Case(job["op"], 4, job["D"], 16, job["dtype"])
    runner = make_runner(job["backend"], case.op, Inputs.make(case, "cpu"))
    setup, timed = pass_steps(runner, "fwd_bwd")
    timed(setup())
    del runner, setup, timed
    measure.release_free_memory()


def measure_job(job, warmed, use_hwm):
    """Yields (pass, MiB or None, error or None) for each pass of the job."""
    try:
        _warm(job, warmed)
        inputs = Inputs.make(_case(job), "cpu")
        runner = make_runner(job["backend"], job["op"], inputs)
    except Exception as error:  # noqa: BLE001
        for pass_name in job["passes"]:
            yield pass_name, None, f"{type(error).__name__}: {error}"
        return
    for pass_name in job["passes"]:
        try:
            setup, timed = pass_steps(runner, pass_name)
            if use_hwm:
                yield pass_name, measure.cpu_extra_peak_mb(setup, timed), None
            else:
                yield pass_name, measure.cpu_extra_peak_mb_maxrss(setup, timed), None
        except Exception as error:  # noqa: BLE001
            yield pass_name, None, f"{type(error).__name__}: {error}"
        runner.zero_grad()
        measure.release_free_memory()


def _single_child(job):
    """ru_maxrss fallback: one pass of one job in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "normface_kernels.bench.memworker", "--single"],
                          input=json.dumps(job), capture_output=True, text=True,
                          env=worker_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None, f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    reply = json.loads(lines[-1])
    return reply["mb"], reply["error"]


def _emit(**fields):
    print(json.dumps(fields), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    measure.tune_malloc_for_rss()
    torch.set_num_threads(int(os.environ.get("NORMFACE_BENCH_THREADS", torch.get_num_threads())))
    if "--single" in argv:
        job = json.loads(sys.stdin.read())
        for _, mb, error in measure_job(job, set(), use_hwm=False):
            _emit(mb=mb, error=error)
        return
    jobs = json.loads(sys.stdin.read())
    use_hwm = measure.hwm_reset_works()
    _emit(method="VmHWM reset (/proc/self/clear_refs)" if use_hwm
          else "ru_maxrss in a fresh process per pass")
    warmed = set()
    for index, job in enumerate(jobs):
        if use_hwm:
            for pass_name, mb, error in measure_job(job, warmed, use_hwm=True):
                _emit(job=index, pass_name=pass_name, mb=mb, error=error)
        else:
            for pass_name in job["passes"]:
                mb, error = _single_child(dict(job, passes=[pass_name]))
                _emit(job=index, pass_name=pass_name, mb=mb, error=error)


def worker_env():
    """The environment for a worker: this package importable however it was found."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NORMFACE_BENCH_THREADS"] = str(torch.get_num_threads())
    return env


def run_jobs(jobs, on_result, on_method=None):
    """Run `jobs` in worker processes; on_result(job_index, pass, mb, error) for each pass.

    A worker that dies (e.g. killed for memory) costs only the pass it was in: the pass is
    reported with the error and a new worker takes the remaining jobs.
    """
    pending = list(range(len(jobs)))
    while pending:
        proc = subprocess.Popen(
            [sys.executable, "-m", "normface_kernels.bench.memworker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env())
        proc.stdin.write(json.dumps([jobs[i] for i in pending]))
        proc.stdin.close()
        done = {i: set() for i in pending}
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            reply = json.loads(line)
            if "method" in reply:
                if on_method is not None:
                    on_method(reply["method"])
                continue
            index = pending[reply["job"]]
            done[index].add(reply["pass_name"])
            on_result(index, reply["pass_name"], reply["mb"], reply["error"])
        stderr = proc.stderr.read()
        proc.wait()
        remaining = [i for i in pending if len(done[i]) < len(jobs[i]["passes"])]
        if not remaining:
            return
        if proc.returncode == 0:   # finished without answering: should not happen
            for i in remaining:
                for pass_name in jobs[i]["passes"]:
                    if pass_name not in done[i]:
                        on_result(i, pass_name, None, "no answer from the memory worker")
            return
        crashed = remaining[0]
        why = f"memory worker exited {proc.returncode}"
        if proc.returncode in (-9, 137):
            why += " (killed: out of memory?)"
        tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
        for pass_name in jobs[crashed]["passes"]:
            if pass_name not in done[crashed]:
                on_result(crashed, pass_name, None, "; ".join([why] + tail))
        pending = remaining[1:]


if __name__ == "__main__":
    main()
