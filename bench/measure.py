"""What every benchmark shares: run a command and report its wall time and the peak resident
memory of its whole process tree (workers included); repeat setups interleaved and report the
median and range; print result tables. (Timing training steps after a warm-up: bench/steps.py.)

Every figure a benchmark prints is the median of its repeats, with the range (min-max) beside it:
a ratio of two setups is only resolved when their ranges do not overlap."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
SAMPLER_SHARE = 0.05  # of one core, at most, for the memory sampler


@dataclass
class Measured:
    seconds: float
    peak_rss: int  # bytes of PSS summed over the process and its children at the worst moment
    output: str


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process tree, as PSS: pages forked workers share with their parent
    are counted once, not once per process as plain RSS would."""
    total = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in family:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> Measured:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        try:
            watched = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while proc.poll() is None:
            cost = time.thread_time()
            peak[0] = max(peak[0], tree_rss(watched))
            cost = time.thread_time() - cost
            # reading PSS walks every page table (about 20 ms of CPU for a process tree with torch
            # loaded): sampled every 50 ms it took a third of a core from what is measured, so the
            # sampler waits long enough to use at most SAMPLER_SHARE of one core
            time.sleep(max(0.05, cost / SAMPLER_SHARE))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{output[-4000:]}")
    return Measured(seconds, peak[0], output)


def machine() -> str:
    cpus = psutil.cpu_count(logical=True)
    memory = psutil.virtual_memory().total / GIB
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {cpus} CPUs, {memory:.0f} GiB RAM, Python {platform.python_version()}"


def table(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        return f"{value:,.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fresh_clone(dest: Path) -> Path:
    """A clone of this repository's committed HEAD, as a user would start from."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return dest


def dvc(clone: Path, *args: str) -> Measured:
    return run([sys.executable, "-m", "dvc", *args], clone)


def interleaved(setups: dict[str, Callable[[], dict]], repeats: int, warmup: bool = True) -> dict[str, list[dict]]:
    """Run every setup `repeats` times, alternating their order from round to round (ABAB…, then
    BA…), so that a drift of the machine (caches, another load) falls on all of them alike. With
    `warmup`, one untimed round first (file caches, lazy imports, compiled kernels)."""
    results: dict[str, list[dict]] = {name: [] for name in setups}
    names = list(setups)
    for round_ in range(-1 if warmup else 0, repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            result = setups[name]()
            if round_ >= 0:
                results[name].append(result)
            print(f"{'warm-up' if round_ < 0 else f'round {round_ + 1}'}: {name}: {result}", flush=True)
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def spread(runs: list[dict], key: str, scale: float = 1.0, digits: str = ".3g") -> str:
    """'median (min-max)' of `key` over the runs, each value divided by `scale`."""
    values = sorted(run[key] / scale for run in runs)
    return f"{statistics.median(values):{digits}} ({values[0]:{digits}}-{values[-1]:{digits}})"


def ratio_spread(numerators: list[dict], denominators: list[dict], key: str) -> tuple[float, str]:
    """The ratio of the medians, and the range of the ratio over every pair of runs."""
    ratios = sorted(a[key] / b[key] for a in numerators for b in denominators)
    value = median(numerators, key) / median(denominators, key)
    return value, f"{value:.3g} (range {ratios[0]:.3g}-{ratios[-1]:.3g})"


def git_commit() -> str:
    """The commit the figures come from (with -dirty when the checkout has uncommitted changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")


def header(title: str, command: str) -> str:
    """The heading of a benchmark's printout: what, the command that reproduces it, commit and machine."""
    return f"\n## {title}\n\n`{command}` at commit {git_commit()} on {machine()}\n"
