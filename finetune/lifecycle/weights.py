"""Is a .safetensors file whole? Read without torch: the header (8-byte length + JSON), every tensor's byte range
against the file's size, and on request every value (NaN / inf). A truncated or damaged weights file is refused
with its name and what is wrong, before any command tries to load it."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

# safetensors dtype -> bytes per element
ITEM_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
CHUNK = 1 << 24


def read_header(path: Path) -> dict[str, Any]:
    """The tensor table of `path` (name -> {dtype, shape, data_offsets}); FinetuneError if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FinetuneError(f"{path}: only {len(head)} bytes long, not a safetensors file")
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER:
                raise FinetuneError(f"{path}: not a safetensors file (header length {size:,} bytes)")
            raw = fh.read(size)
    except OSError as exc:
        raise FinetuneError(f"{path}: cannot read the weights file: {exc.strerror or exc}") from None
    if len(raw) < size:
        raise FinetuneError(f"{path}: truncated inside its header ({len(raw)} of {size} bytes)")
    try:
        header = json.loads(raw)
    except ValueError:
        raise FinetuneError(f"{path}: its header is not valid JSON, so it is not a safetensors file") from None
    if not isinstance(header, dict):
        raise FinetuneError(f"{path}: its header is not a table of tensors")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def weights_problems(path: Path, read_values: bool = False) -> list[str]:
    """What is wrong with the weights file: byte ranges that do not fit the file (truncation), sizes that do not
    match the shapes, and with `read_values`, tensors holding NaN or inf."""
    try:
        header = read_header(path)
    except FinetuneError as exc:
        return [str(exc)]
    data_start = 8 + len(_raw_header(path))
    available = path.stat().st_size - data_start
    problems, end = [], 0
    for name, spec in header.items():
        problem = _tensor_problem(name, spec, available)
        if problem:
            problems.append(f"{path}: {problem}")
            continue
        end = max(end, spec["data_offsets"][1])
    if not problems and end < available:
        problems.append(f"{path}: {available - end:,} bytes after the last tensor: not a file safetensors wrote")
    if read_values and not problems:
        problems += [f"{path}: {p}" for p in _value_problems(path, header, data_start)]
    return problems


def check_weights_file(path: Path) -> None:
    """Raise FinetuneError naming the first problem of `path` (header and byte ranges only: fast)."""
    problems = weights_problems(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FinetuneError(f"{problems[0]}{more}; {FIX}")


FIX = "the file is damaged or was cut short (an interrupted copy or download?): copy it again, or retrain"


def _raw_header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return fh.read(size)


def _tensor_problem(name: str, spec: Any, available: int) -> str | None:
    if not isinstance(spec, dict) or spec.get("dtype") not in ITEM_SIZE:
        return f"tensor '{name}' has an unknown dtype {spec.get('dtype') if isinstance(spec, dict) else spec!r}"
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"tensor '{name}' has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"tensor '{name}' has invalid data offsets {offsets!r}"
    begin, stop = offsets
    want = math.prod(shape) * ITEM_SIZE[spec["dtype"]]
    if stop - begin != want or begin < 0:
        return f"tensor '{name}' {shape} {spec['dtype']} should take {want:,} bytes, its range holds {stop - begin:,}"
    if stop > available:
        return (f"tensor '{name}' ends at byte {stop:,} of the data but the file holds only {max(available, 0):,}: "
                "the file is truncated")
    return None


def _value_problems(path: Path, header: dict[str, Any], data_start: int) -> list[str]:
    """Tensors holding NaN or inf (float dtypes), read a tensor at a time, in chunks."""
    import numpy as np

    masks = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}  # exponent bits all set: inf or NaN
    out = []
    with open(path, "rb") as fh:
        for name, spec in header.items():
            dtype = spec["dtype"]
            if dtype not in ("F16", "BF16", "F32", "F64"):
                continue
            begin, stop = spec["data_offsets"]
            fh.seek(data_start + begin)
            bad, left = 0, stop - begin
            while left > 0:
                chunk = fh.read(min(CHUNK, left))
                left -= len(chunk)
                if dtype in masks:
                    kind, mask = masks[dtype]
                    bits = np.frombuffer(chunk, dtype=kind)
                    bad += int(((bits & mask) == mask).sum())
                else:
                    values = np.frombuffer(chunk, dtype=np.float32 if dtype == "F32" else np.float64)
                    bad += int((~np.isfinite(values)).sum())
            if bad:
                out.append(f"tensor '{name}' holds {bad:,} NaN or inf values")
    return out
