"""`--profile N`: torch.profiler over the first N optimizer steps, its top-ops table written to profile.txt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROFILE = "profile.txt"


class StepProfiler:
    """Call `step_done(step)` after each optimizer step; the table is written after `steps` of them."""

    def __init__(self, steps: int, out: Path, enabled: bool, first_step: int = 1):
        self.steps, self.out, self.last = steps, out, first_step + steps - 1
        self.prof: Any = None
        if steps and enabled:
            import torch
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, record_shapes=False)
            self.prof.__enter__()

    def step_done(self, step: int) -> None:
        if self.prof is not None and step >= self.last:
            self.finish()

    def finish(self) -> None:
        if self.prof is None:
            return
        import torch

        self.prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=30)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(f"torch.profiler: top ops over {self.steps} optimizer steps, sorted by {sort}\n\n{table}\n")
        self.prof = None
