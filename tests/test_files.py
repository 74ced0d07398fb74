"""finetune.files: one policy for every output folder. Written whole or not at all, the old output kept until the new
one is in place, and nothing replaced or deleted that finetune did not write as the same kind of output."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from finetune import files
from finetune.errors import FinetuneError
from finetune.files import MARKER, atomic_dir, atomic_file, output_kind, recover, remove_output


def _make(final: Path, kind: str, content: str, overwrite: bool = False) -> None:
    with atomic_dir(final, kind, overwrite=overwrite) as tmp:
        (tmp / "weights.txt").write_text(content)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text(errors="replace") for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_appears_whole_with_its_marker_and_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "out" / "run"
    _make(final, "adapter", "v1")
    assert (final / "weights.txt").read_text() == "v1" and output_kind(final) == "adapter"
    assert json.loads((final / MARKER).read_text())["complete"] is True
    assert sorted(p.name for p in final.parent.iterdir()) == ["run"]


def test_existing_output_needs_overwrite_and_the_same_kind(tmp_path: Path) -> None:
    final = tmp_path / "run"
    _make(final, "adapter", "v1")
    with pytest.raises(FinetuneError, match="exists; choose another name, or set overwrite"):
        _make(final, "adapter", "v2")
    with pytest.raises(FinetuneError, match="it is an adapter output, not a merged-model"):
        _make(final, "merged-model", "v2", overwrite=True)
    _make(final, "adapter", "v2", overwrite=True)
    assert (final / "weights.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the old output is gone, nothing left beside


@pytest.mark.parametrize("what", ["cwd", "user_folder", "file"])
def test_never_replaces_what_finetune_did_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """`finetune merge ADAPTER --out . --overwrite` once deleted the working directory: a folder without our marker
    is never replaced, even with overwrite."""
    home = tmp_path / "work"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    (home / "sub").mkdir()
    (home / "sub" / "data.csv").write_text("a,b")
    monkeypatch.chdir(home)
    target = {"cwd": Path("."), "user_folder": Path("sub"), "file": Path("notes.txt")}[what]
    before = _tree(tmp_path)
    with pytest.raises(FinetuneError, match="refusing to replace .*finetune only replaces its own previous merged-model"):
        _make(target, "merged-model", "merged", overwrite=True)
    assert _tree(tmp_path) == before


def test_a_failure_inside_leaves_the_previous_output_untouched(tmp_path: Path) -> None:
    final = tmp_path / "run"
    _make(final, "adapter", "v1")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError, match="verification failed"), atomic_dir(final, "adapter", overwrite=True) as tmp:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("verification failed")
    assert _tree(tmp_path) == before


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_reader(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem cannot swap atomically, an overwrite renames the old output aside first. A crash right
    after that leaves no output under its name; the next command puts the old one back."""
    final = tmp_path / "run"
    _make(final, "adapter", "v1")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_second(src: object, dst: object) -> None:
        real_rename(src, dst)  # type: ignore[arg-type]
        if str(dst).endswith(tuple(f".old-{os.getpid()}" for _ in [0])):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _make(final, "adapter", "v2", overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not final.exists() and list(tmp_path.glob(".run.old-*"))
    recover(final)
    assert (final / "weights.txt").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_two_rename_path_replaces_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "run"
    _make(final, "adapter", "v1")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    _make(final, "adapter", "v2", overwrite=True)
    assert (final / "weights.txt").read_text() == "v2" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_stale_temporaries_of_dead_processes_are_cleared(tmp_path: Path) -> None:
    dead = tmp_path / ".run.tmp-999999999"
    dead.mkdir()
    (dead / MARKER).write_text('{"kind": "adapter", "complete": false}')
    foreign = tmp_path / ".run.tmp-999999998"  # no marker: not ours, left alone
    foreign.mkdir()
    _make(tmp_path / "run", "adapter", "v1")
    assert not dead.exists() and foreign.exists()


def test_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Some writers create 0600 temporaries (a merged model.safetensors was 0600, unlike its siblings)."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "run", "merged-model") as tmp:
            private = tmp / "model.safetensors"
            private.write_text("x")
            private.chmod(0o600)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "run" / "model.safetensors").stat().st_mode)
    assert mode == 0o644 and stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


def test_remove_output_deletes_only_its_own_kind(tmp_path: Path) -> None:
    _make(tmp_path / "step-1", "checkpoint", "c")
    (tmp_path / "mine").mkdir()
    remove_output(tmp_path / "mine", "checkpoint")
    remove_output(tmp_path / "step-1", "adapter")
    assert (tmp_path / "mine").exists() and (tmp_path / "step-1").exists()
    remove_output(tmp_path / "step-1", "checkpoint")
    assert not (tmp_path / "step-1").exists()


def test_outputs_written_before_markers_are_still_recognised(tmp_path: Path) -> None:
    old = tmp_path / "old_adapter"
    old.mkdir()
    (old / "run.json").write_text("{}")
    (old / "finetune.yaml").write_text("x: 1")
    assert output_kind(old) == "adapter"
    _make(old, "adapter", "new", overwrite=True)
    assert (old / "weights.txt").read_text() == "new"


def test_atomic_file_replaces_only_a_recognised_file(tmp_path: Path) -> None:
    mine, other = tmp_path / "a.gguf", tmp_path / "b.gguf"
    mine.write_bytes(b"GGUF old")
    other.write_text("not a gguf")
    is_gguf = lambda p: p.read_bytes()[:4] == b"GGUF"  # noqa: E731
    with atomic_file(mine, is_gguf, "a GGUF file") as tmp:
        tmp.write_bytes(b"GGUF new")
    assert mine.read_bytes() == b"GGUF new"
    with pytest.raises(FinetuneError, match="not a GGUF file"), atomic_file(other, is_gguf, "a GGUF file") as tmp:
        tmp.write_bytes(b"GGUF new")
    assert other.read_text() == "not a gguf" and sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]


def test_merge_refuses_the_working_directory_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data-loss report, through the CLI: `finetune merge ADAPTER --out . --overwrite` exits 1, deletes nothing,
    and says why, before loading any model."""
    from finetune.cli import main

    (tmp_path / "keep.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapters" / "a"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nonexistent"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    before = _tree(tmp_path)
    assert main(["merge", str(adapter), "--out", ".", "--overwrite"]) == 1
    assert _tree(tmp_path) == before
