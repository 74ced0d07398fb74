"""What the user sees and does while training runs: the progress bar (main process only) and SIGTERM/SIGINT."""

from __future__ import annotations

import signal
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
    """A rich progress bar with step/total, loss, lr, tokens/s and ETA, on the main process only."""

    def __init__(self, accelerator: Any, total: int, done: int = 0):
        self.enabled, self.total, self.done = accelerator.is_main_process, total, done

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda step, row: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.bar.start()
        task = self.bar.add_task("train", total=self.total, completed=self.done, info="")

        def update(step: int, row: dict[str, Any]) -> None:
            info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
            self.bar.update(task, completed=step, info=info)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.stop()
