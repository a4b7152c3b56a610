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
        # The message is kept on one line so that logs and CI output stay greppable, and control characters
        # (a newline or an ANSI escape in a file name) are shown escaped, never sent to the terminal.
        super().__init__(one_line(message))
        self.problems = list(problems or [])


class FormatError(UserError):
    """The checkpoint file is not a valid safetensors / torch file."""


class MappingError(UserError):
    """The mapping spec is invalid or does not fit the checkpoint; `problems` lists every finding."""


class OutputError(UserError):
    """The output cannot be written (exists, disk full, I/O error)."""


def literal(text) -> str:
    """`text` as it must be printed: unchanged when printable, else every control / format / surrogate character
    escaped (a newline as \\n, ESC as \\x1b), so a file name or key never moves the cursor or colours a terminal."""
    t = str(text)
    if t.isprintable():
        return t
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in t)


def one_line(text) -> str:
    """`text` on one line: newlines become spaces, other control characters are escaped (see `literal`)."""
    return literal(" ".join(str(text).split("\n")))


def show(value, limit: int = 120) -> str:
    """A short, one-line repr of a value from the user's files for a message (deep or huge values abbreviated)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, limit, limit
    s = r.repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def summarize(problems: list[str], limit: int = 3) -> str:
    """Join the first `limit` problems on one line and say how many more there are."""
    head = "; ".join(problems[:limit])
    more = len(problems) - limit
    return head + (f"; … and {more} more" if more > 0 else "")
