"""What the user sees and does while training runs: the progress bar (main process only) and SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the current step and exits with a message."""

    received = False

    def __enter__(self) -> StopSignal:
        self.old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for sig in self.old:
                signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a demo's worker): no handlers, nothing to restore
            self.old = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


class ProgressBar:
    """Progress on the main process: a rich bar on a terminal; where stdout is not a terminal (CI, nohup, a cluster
    job's log, where a bar would show nothing until the end) one plain line every `every` steps and at the last.

    Rows carry `tokens_per_s` (input tokens the model reads, padding excluded) and `targets_per_s` (what the loss is
    summed over: answer tokens, or examples for classification, named by `unit`)."""

    def __init__(self, accelerator: Any, total: int, done: int = 0, every: int = 1, unit: str = "target tokens",
                 terminal: bool | None = None):
        self.enabled, self.total, self.done, self.every, self.unit = accelerator.is_main_process, total, done, every, unit
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.start = time.perf_counter()

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda step, row: None
        if not self.terminal:
            return self._line
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.bar.start()
        task = self.bar.add_task("train", total=self.total, completed=self.done, info="")

        def update(step: int, row: dict[str, Any]) -> None:
            self.bar.update(task, completed=step, info=self._info(row))

        return update

    def _info(self, row: dict[str, Any]) -> str:
        unit = "examples/s" if self.unit == "examples" else "target/s"
        return (f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:,.0f} tok/s  "
                f"{row['targets_per_s']:,.{1 if self.unit == 'examples' else 0}f} {unit}")

    def _line(self, step: int, row: dict[str, Any]) -> None:
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / max(step - self.done, 1) * (self.total - step)
        print(f"step {step}/{self.total}  {self._info(row)}  elapsed {_clock(elapsed)}  ETA {_clock(left)}", flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled and self.terminal:
            self.bar.stop()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
