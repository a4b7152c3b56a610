"""User-facing errors.

Everything the user can fix (a bad file, a mapping that does not cover a key, a full disk) raises a
`UserError` whose message is ONE line naming the file / key / shape involved; the CLI turns it into exit
code 2. Any other exception is a bug and exits 1.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment (CLI exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        # The message is kept on one line so that logs and CI output stay greppable.
        super().__init__(" ".join(str(message).split("\n")))
        self.problems = list(problems or [])


class FormatError(UserError):
    """The checkpoint file is not a valid safetensors / torch file."""


class MappingError(UserError):
    """The mapping spec is invalid or does not fit the checkpoint; `problems` lists every finding."""


class OutputError(UserError):
    """The output cannot be written (exists, disk full, I/O error)."""


def summarize(problems: list[str], limit: int = 3) -> str:
    """Join the first `limit` problems on one line and say how many more there are."""
    head = "; ".join(problems[:limit])
    more = len(problems) - limit
    return head + (f"; … and {more} more" if more > 0 else "")
