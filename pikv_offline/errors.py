"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PikvError(Exception):
    """Bad input or state a user can fix; the message says what was wrong and what to do."""


def brief(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: for one-line errors."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
