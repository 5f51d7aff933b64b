"""The one exception type a user is meant to see, and how a caught exception is quoted in its message.

Anything raised as `TndError` is bad input (params, data, a model, a cache) that the
user can fix; stages print its message on one line and exit with code 2. Anything
else is a bug and keeps its traceback.
"""


class TndError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class ParamsError(TndError):
    """params.yaml is invalid."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """`exc`'s message on one line (white space folded), for quoting inside a one-line error; cut to
    `limit` characters, the cut marked "...", when given."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
