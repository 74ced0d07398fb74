"""User-facing errors: the CLI prints the message (no traceback) and exits with `exit_code`."""


class FinetuneError(Exception):
    """Bad input or an unmet precondition; the message says what, where, and how to fix it."""

    exit_code = 1


class DataError(FinetuneError):
    """A problem in the user's data: names the file, the line or row, and the field."""


class ModelError(FinetuneError):
    """The checkpoint cannot be loaded or does not fit the tokenizer or the task."""


class VerificationError(FinetuneError):
    """An output failed its check after writing; nothing was left in its place."""
