"""The base class every config section derives from: unknown keys are errors, assignments are validated."""

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

CROSS_FIELD = "cross_field"


class Section(BaseModel):
    """A strict config section: a misspelt key is an error (the anchors' most common silent failure)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)


def conflict(field: str, message: str, hint: str, *others: str) -> PydanticCustomError:
    """A problem that involves several fields, reported at `field` (dotted, relative to the section that raises it)
    with a hint; the loader turns it into file:line like any other problem (the line of `field`, else of the first
    of `others` written in the file). `config validate` and `train` both see it, because it is part of the model."""
    # The message is a template filled from the context: no braces in it.
    return PydanticCustomError(CROSS_FIELD, message, {"field": field, "hint": hint, "others": ",".join(others)})
