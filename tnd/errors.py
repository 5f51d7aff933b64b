"""The one exception type a user is meant to see.

Anything raised as `TndError` is bad input (params, data, a model, a cache) that the
user can fix; stages print its message on one line and exit with code 2. Anything
else is a bug and keeps its traceback.
"""


class TndError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""


class ParamsError(TndError):
    """params.yaml is invalid."""
