"""run.json: what someone needs to trust and reproduce an adapter (versions, commit, hardware, data, metrics)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("finetune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "bitsandbytes")


def package_versions() -> dict[str, str]:
    """Installed versions of finetune, the libraries that decide its results and Python; absent packages left out."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the repository the job runs in, '+dirty' when it has uncommitted changes; None outside git."""
    cwd = str(where or Path.cwd())
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def hardware(num_processes: int = 1) -> dict[str, Any]:
    """Platform, CPU cores and process count; with CUDA, also the first GPU's name, the GPU count and CUDA version."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "num_processes": num_processes}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second (e.g. 2025-01-31T12:00:00+00:00)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
