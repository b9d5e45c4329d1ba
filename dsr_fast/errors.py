"""The one exception type for bad user input."""


class InputError(ValueError):
    """A file, field or flag the user gave is wrong. The message names what and where.

    Entry points (`python -m dsr_fast.train`, `python -m dsr_fast.eval`) print it as one line and
    exit with status 2 instead of a traceback; library callers can catch it as a ValueError.
    """
