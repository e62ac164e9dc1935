"""The one exception type for mistakes a user can make (bad settings, missing files, mismatched data).

The command-line entry points print its message on one line and exit with status 2; anything else that escapes is
our bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library messages run on), or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
