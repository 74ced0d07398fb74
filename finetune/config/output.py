"""`output:` where the adapter folder lands."""

from pathlib import Path

from pydantic import Field

from finetune.config.base import Section


class OutputConfig(Section):
    """The `output:` section."""

    dir: str = Field(default="adapters", description="Parent folder of adapter folders (relative to the working directory).")
    run_name: str = Field(
        default="run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of this run; the adapter is saved in <dir>/<run_name>/.",
    )
    overwrite: bool = Field(
        default=False, description="Replace an existing adapter folder of the same name (only after the new one is verified)."
    )

    @property
    def adapter_dir(self) -> Path:
        """The adapter folder: <dir>/<run_name>, written whole at the end of training."""
        return Path(self.dir) / self.run_name

    @property
    def work_dir(self) -> Path:
        """Metrics and checkpoints while training runs: <dir>/.work/<run_name>, never published."""
        return Path(self.dir) / ".work" / self.run_name
