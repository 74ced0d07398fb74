"""The base class every config section derives from: unknown keys are errors, assignments are validated."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict config section: a misspelt key is an error (the anchors' most common silent failure)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)
