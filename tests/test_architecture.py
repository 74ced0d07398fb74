"""The layout is a contract: the layer order (import-linter, configured in pyproject.toml), no import cycles, and every
command module importable (no command hidden by a typo)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_cycles_function_level_imports_included() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("finetune", include_external_packages=False, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layer_contract_holds() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


def test_every_command_module_imports_and_has_its_interface() -> None:
    from finetune.cli import COMMANDS

    for verb, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.run) and callable(module.add_arguments) and module.HELP, verb
    commands_dir = ROOT / "finetune" / "commands"
    on_disk = {f"finetune.commands.{p.stem}" for p in commands_dir.glob("*.py") if p.stem != "__init__"}
    assert on_disk == set(COMMANDS.values()), "a command module is not registered in cli.COMMANDS, or vice versa"
