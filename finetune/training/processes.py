"""Processes and data order: one Accelerator per process, a deterministic global example order sharded by rank.

On a CPU-only machine accelerate's launcher has two traps (measured, see docs/training.md): `accelerate launch
--num_processes 2` (with or without --cpu) starts ONE process, and `--multi_gpu` / torchrun start two processes
that each train alone unless the Accelerator is built in CPU mode. We relaunch the first through torchrun and build
the Accelerator in CPU mode for the second, then refuse any remaining mismatch between the launcher's world size
and the processes that actually joined.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from accelerate import Accelerator

RELAUNCHED = "FINETUNE_RELAUNCHED"


def make_accelerator(precision: str, trackers: list[str] | None = None, project_dir: str | None = None) -> Accelerator:
    """This process's Accelerator at `precision` (train.precision), in CPU mode for a multi-process CPU run.

    Raises FinetuneError for a precision this machine cannot run, or when fewer processes joined than were launched."""
    import torch
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.cuda.is_available()  # without cpu=True each CPU process would train alone
    acc = Accelerator(mixed_precision=resolve_precision(precision), cpu=cpu or None, log_with=trackers or None,
                      project_dir=project_dir)
    if acc.num_processes != world:
        raise FinetuneError(
            f"the launcher started {world} processes but only {acc.num_processes} joined one training group: they "
            "would train unsynchronised copies. On CPU use `accelerate launch --num_processes N -m finetune train JOB.yaml`."
        )
    return acc


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision value; fp16 on CPU is refused (accelerate would silently ignore it)."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise FinetuneError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 (if the CPU supports it) or fp32")
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16() else "no"
    if precision == "bf16" and not cuda and not cpu_bf16():
        raise FinetuneError("train.precision=bf16: this CPU has no bf16 support; use fp32")
    return {"fp32": "no"}.get(precision, precision)


def cpu_bf16() -> bool:
    """Whether this CPU computes in bf16 (oneDNN's check); False when torch cannot tell."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def requested_processes(cmdline: list[str] | None = None) -> int:
    """How many processes the parent `accelerate launch` was asked for (1 when the parent is something else)."""
    if cmdline is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                cmdline = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            return 1
    if not any(a.endswith("accelerate") for a in cmdline[:2]) or "launch" not in cmdline:
        return 1
    for i, arg in enumerate(cmdline):
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1])
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(cmdline):
            return int(cmdline[i + 1])
    return 1


def maybe_relaunch(argv: list[str]) -> int | None:
    """Under `accelerate launch --num_processes N` on a CPU-only machine only one process was started: start the N
    synchronised ones through torchrun and return their exit status. None: nothing to do, go on in this process."""
    import torch

    wanted = requested_processes()
    if wanted <= 1 or "WORLD_SIZE" in os.environ or os.environ.get(RELAUNCHED) or torch.cuda.is_available():
        return None
    with socket.socket() as s:  # a free port, so two jobs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={wanted}", f"--master_port={port}",
           "-m", "finetune", *argv]
    print(f"accelerate started 1 process on this CPU-only machine; starting {wanted} synchronised ones", flush=True)
    env = {**os.environ, RELAUNCHED: "1", "ACCELERATE_USE_CPU": "1"}
    return subprocess.call(cmd, env=env)


@dataclass
class DataPlan:
    """The global example order and each rank's share of an optimizer step.

    Examples are consumed as one stream: epoch e is a permutation of the training set seeded by (seed, e), epochs
    follow each other, and an optimizer step takes the next micro_batch * accumulation * world examples. Rank r
    gets slice r of every micro-batch group, so with w processes x micro-batch b a step sees exactly the examples one
    process with micro-batch w*b sees; nothing is dropped or repeated. `cursor` (examples consumed) is the whole data
    position, which makes resuming exact.
    """

    size: int | None  # None: an iterable (streaming) dataset, read in order
    seed: int
    shuffle: bool = True
    cursor: int = 0

    def order(self, epoch: int) -> list[int]:
        import torch

        assert self.size is not None
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()

    def take(self, count: int) -> list[int]:
        """The next `count` global positions (indices into the dataset), advancing the cursor."""
        assert self.size is not None
        out: list[int] = []
        while len(out) < count:
            epoch, offset = divmod(self.cursor, self.size)
            chunk = self.order(epoch)[offset: offset + count - len(out)]
            out.extend(chunk)
            self.cursor += len(chunk)
        return out


def step_examples(data: Any, plan: DataPlan, stream: Iterator[Any] | None, per_step: int) -> list[Any]:
    """All processes' examples for one optimizer step, in global order."""
    if plan.size is not None:
        return [data[i] for i in plan.take(per_step)]
    assert stream is not None
    rows = [next(stream) for _ in range(per_step)]
    plan.cursor += per_step
    return rows


def stream_from(data: Any, skip: int) -> Iterator[Any]:
    """Endless pass over an iterable dataset, epoch after epoch, skipping the first `skip` examples (resume)."""
    epoch = 0
    while True:
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        empty = True
        for row in data:
            empty = False
            if skip:
                skip -= 1
                continue
            yield row
        if empty:
            raise FinetuneError("data.train: the streaming dataset yielded no examples")
        epoch += 1


def rank_share(rows: list[Any], micro: int, accumulation: int, rank: int, world: int) -> list[list[Any]]:
    """This rank's micro-batches of a step: micro-batch group i holds world*micro rows; rank r takes slice r."""
    out = []
    group = micro * world
    for i in range(accumulation):
        block = rows[i * group: (i + 1) * group]
        out.append(block[rank * micro: (rank + 1) * micro])
    return out


def validation_share(dataset: Any, rank: int, world: int) -> list[Any]:
    """Rank r's validation examples: r, r+w, ... (every example once over all ranks)."""
    from torch.utils.data import IterableDataset

    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return [dataset[i] for i in range(rank, len(dataset), world)]
    return [ex for i, ex in enumerate(dataset) if i % world == rank]
