"""What every benchmark shares: run a command and report its wall time and the peak resident
memory of its whole process tree (workers included), and print result tables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


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
            peak[0] = max(peak[0], tree_rss(watched))
            time.sleep(0.05)

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


def verdict(name: str, value: float, goal: str, met: bool) -> str:
    return f"- {name}: {value:.3g} (goal {goal}): {'MET' if met else 'NOT MET'}"


def fresh_clone(dest: Path) -> Path:
    """A clone of this repository's committed HEAD, as a user would start from."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return dest


def dvc(clone: Path, *args: str) -> Measured:
    return run([sys.executable, "-m", "dvc", *args], clone)
