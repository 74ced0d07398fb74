"""Config problems: each one says where (file, line, dotted path), what is wrong, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a job: where (dotted path, YAML line), what is wrong, and how to fix it."""

    path: str  # dotted path of the field, e.g. "lora.r"
    message: str  # what is wrong and what is expected
    line: int | None = None  # 1-based line in the YAML file, when the key is there
    hint: str | None = None  # how to fix it, e.g. "did you mean 'lora.r'?"

    def format(self, source: str) -> str:
        """`source:line: path: message` (no line when the key is not in the file), then the hint on its own line."""
        where = f"{source}:{self.line}" if self.line else source
        text = f"{where}: {self.path or '<root>'}: {self.message}"
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class ConfigError(Exception):
    """Every problem found in a job config, reported together (exit code 2)."""

    exit_code = 2

    def __init__(self, source: str, problems: list[ConfigProblem]):
        self.source = source
        # In file order, so the report reads top to bottom like the YAML; problems without a line come last.
        self.problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        super().__init__(self.format())

    def format(self) -> str:
        """A head line counting the problems, then each problem indented, in file order."""
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''} in the config"
        return "\n".join([head, *("  " + p.format(self.source).replace("\n", "\n  ") for p in self.problems)])
