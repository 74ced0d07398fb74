"""`output:` where the adapter folder lands."""

from pydantic import Field

from finetune.config.base import Section


class OutputConfig(Section):
    dir: str = Field(default="adapters", description="Parent folder of adapter folders (relative to the working directory).")
    run_name: str = Field(
        default="run",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Name of this run; the adapter is saved in <dir>/<run_name>/.",
    )
    overwrite: bool = Field(
        default=False, description="Replace an existing adapter folder of the same name (only after the new one is verified)."
    )
