"""Training steps timed after a warm-up, for the benchmarks that train (kept apart from
bench/measure.py so that the benchmarks that only start processes do not import torch)."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Timestamps the end of every optimizer step (synchronizing CUDA first), so throughput can
    be taken over the steps after a warm-up."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def steady_seconds(self, warmup_steps: int) -> float:
        """Wall time of the steps after the first `warmup_steps` (at least 1)."""
        if not 1 <= warmup_steps < len(self.ends):
            raise ValueError(f"{len(self.ends)} steps ran: need 1 or more warm-up steps and timed steps after them")
        return self.ends[-1] - self.ends[warmup_steps - 1]
