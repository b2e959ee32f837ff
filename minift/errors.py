"""One exception type for every mistake a user can make.

The message is one line that says what was wrong and what to do; the command line prints it without a
traceback (see cli.py)."""


class MiniftError(Exception):
    pass
