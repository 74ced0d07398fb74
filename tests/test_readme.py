"""The README stays true: its config reference matches the models, and CI runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

from finetune.testing import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current() -> None:
    module = load_script(ROOT / "scripts" / "update_readme.py")
    text = (ROOT / "README.md").read_text()
    assert module.render(text) == text, "run: python scripts/update_readme.py"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block
    commands = [line for line in block.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]]
