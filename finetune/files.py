"""The files finetune writes: output folders that appear whole or not at all, sorted JSON, and the cache root.

One policy for every output (adapter, merged model, checkpoint, GGUF import, data cache, exported file):
- it is written into a temporary sibling (`.NAME.tmp-PID`) and moved into place only when complete;
- an existing output is kept until the new one is in place: the two are swapped in one atomic step where the
  filesystem allows it (Linux renameat2 RENAME_EXCHANGE), else renamed aside first and repaired by the next
  command if a crash falls between the two renames;
- a folder is only ever replaced or deleted when a marker file written by finetune proves it is a previous output
  of the same kind: `finetune merge ... --out . --overwrite` cannot delete the working directory;
- files get the usual permissions under the user's umask (some writers create 0600 temporaries).
Readers skip names starting with '.', so temporaries and set-aside old outputs are never listed or loaded.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

MARKER = ".finetune-output.json"
# Outputs written before the marker existed are recognised by files only finetune writes there together.
LEGACY_PROOF = {
    "adapter": ("run.json", "finetune.yaml"),
    "merged-model": ("merge.json",),
    "checkpoint": ("trainer_state.json",),
    "gguf-import": ("gguf_source.json",),
    "data-cache": ("meta.json",),
}
_RENAME_EXCHANGE = 2


def write_json(path: Path, value: Any) -> Path:
    """Sorted, indented, UTF-8 JSON with a final newline: the one format of finetune's JSON files."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def cache_root() -> Path:
    """$FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "finetune"


def output_kind(folder: Path) -> str | None:
    """The kind of finetune output `folder` is (its marker, or a pre-marker output's files), or None."""
    try:
        return str(json.loads((folder / MARKER).read_text(encoding="utf-8"))["kind"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for kind, proof in LEGACY_PROOF.items():
        if folder.is_dir() and all((folder / name).is_file() for name in proof):
            return kind
    return None


def check_replaceable(final: Path, kind: str, overwrite: bool, flag: str = "overwrite") -> None:
    """Raise unless `final` is absent, or is a previous `kind` output and overwriting was asked for."""
    recover(final)
    if not final.exists() and not final.is_symlink():
        return
    if not overwrite:
        raise FinetuneError(f"{final.resolve()} exists; choose another name, or set {flag} to replace it")
    if not final.is_dir() or final.is_symlink() or output_kind(final) != kind:
        what = "a file" if not final.is_dir() else "a folder finetune did not write"
        found = output_kind(final) if final.is_dir() else None
        if found:
            what = f"{_a(found)} {found} output, not {_a(kind)} {kind}"
        raise FinetuneError(f"refusing to replace {final.resolve()}: it is {what}. finetune only replaces its own "
                            f"previous {kind} output; choose another location")


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@contextmanager
def atomic_dir(final: str | Path, kind: str, overwrite: bool = False, flag: str = "overwrite") -> Iterator[Path]:
    """Yield an empty temporary folder; when the block succeeds it becomes `final` (replacing a previous output of
    the same kind only if `overwrite`); when it fails, or the process dies, `final` is untouched."""
    final = Path(final).absolute()
    check_replaceable(final, kind, overwrite, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _mark(tmp, kind, complete=False)
        yield tmp
        _mark(tmp, kind, complete=True)
        _fix_permissions(tmp)
        _swap_in(tmp, final, kind, overwrite, flag)
    except Exception as exc:
        failure = write_failure(exc, tmp, final, kind)
        if failure is None:
            raise
        raise failure from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: str | Path, is_ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it replaces `final`, which may only be a file that
    `is_ours` recognises (e.g. an earlier export). On failure nothing changes."""
    final = Path(final).absolute()
    if final.exists() and (final.is_dir() or not is_ours(final)):
        raise FinetuneError(f"refusing to replace {final}: it is not {what}; choose another output path")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except Exception as exc:
        failure = write_failure(exc, tmp, final, "file")
        if failure is None:
            raise
        raise failure from None
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(exc: BaseException, tmp: Path, final: Path, what: str) -> FinetuneError | None:
    """A FinetuneError saying that writing `final` failed for a reason of the machine (disk full, quota, read-only,
    permissions) and that nothing was written, or None when `exc` is something else. Writers report a full disk in
    their own words (torch: "unexpected pos", safetensors: "os error 28"), so the free space is checked too."""
    if isinstance(exc, FinetuneError):
        return None  # already says what went wrong
    errno_ = getattr(exc, "errno", None)
    text = str(exc)
    reason = None
    if errno_ in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text or _nearly_full(tmp):
        reason = "the disk is full (no space left on device)"
    elif errno_ == errno.EROFS:
        reason = "the file system is read-only"
    elif errno_ in (errno.EACCES, errno.EPERM):
        reason = f"permission denied ({getattr(exc, 'filename', None) or tmp.parent})"
    if reason is None:
        return None
    state = "the previous one is unchanged" if final.exists() else "nothing is there"
    return FinetuneError(f"could not write the {what} {final}: {reason}. Nothing was written ({state}); "
                         "free some space or choose another location, then run the command again")


def _nearly_full(path: Path) -> bool:
    """Less than 1 MiB left on the file system holding `path` (measured before the partial output is removed)."""
    try:
        stats = os.statvfs(path if path.exists() else path.parent)
    except (OSError, AttributeError):
        return False
    return stats.f_bavail * stats.f_frsize < 2**20


def remove_output(folder: Path, kind: str) -> None:
    """Delete `folder` only if it is a finetune output of `kind` (e.g. an old checkpoint); anything else stays."""
    if folder.is_dir() and not folder.is_symlink() and output_kind(folder) == kind:
        shutil.rmtree(folder, ignore_errors=True)


def recover(final: Path) -> None:
    """Finish an overwrite that a crash interrupted between its two renames: put the old output back under its
    name when the new one never arrived, or drop the set-aside copy when it did. Temporaries of dead processes for
    this output are removed too."""
    final = Path(final).absolute()
    if not final.parent.is_dir():
        return
    _remove_stale(final)
    for old in sorted(final.parent.glob(f".{final.name}.old-*")):
        if output_kind(old) is None:
            continue
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def is_hidden(path: Path) -> bool:
    """Temporaries and set-aside outputs start with '.'; readers skip them."""
    return path.name.startswith(".")


def _mark(folder: Path, kind: str, complete: bool) -> None:
    write_json(folder / MARKER, {"kind": kind, "complete": complete, "pid": os.getpid()})


def _swap_in(tmp: Path, final: Path, kind: str, overwrite: bool, flag: str) -> None:
    check_replaceable(final, kind, overwrite, flag)  # again: something may have appeared while we worked
    if not final.exists():
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:  # another process finished first: replace it by the same rules
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            check_replaceable(final, kind, overwrite=True, flag=flag)
    if _exchange(tmp, final):
        return  # tmp now holds the old output; the caller deletes it
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux >= 3.15 with glibc >= 2.28); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _remove_stale(final: Path) -> None:
    """Temporaries of processes that died mid-write (SIGKILL, power loss) for this output."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if tmp.is_dir() and pid.isdigit() and not _alive(int(pid)) and (tmp / MARKER).is_file():
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fix_permissions(folder: Path) -> None:
    mask = _umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    os.chmod(folder, 0o777 & ~mask)
