"""Errors that mean "the user's input is wrong" (missing data, corrupt checkpoint, unknown model).

The orchestrator turns these into a one-line message and exit code 2; anything else is a bug.
"""


class InputError(ValueError):
    pass
