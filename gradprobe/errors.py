"""The exception types the CLI turns into exit codes: bad input (2) and stop signals (130, 143).

`UserInputError` is raised where the problem is found, with the fix in its message; the CLI
alone turns it into a one-line error and exit code 2.
"""


class UserInputError(Exception):
    """Bad input from the user: the message names the problem and how to fix it."""


class Stopped(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM arrived: unwind, stopping every child and removing every
    temporary on the way, then exit 128 + `signum`. A BaseException, so ``except Exception``
    cannot swallow it; raised by the CLI's signal handlers only."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class InputWarning(UserWarning):
    """Input that is probably not what the user meant but still gives a result; the CLI prints
    it as a ``warning:`` line and scan.json keeps it under ``warnings``."""
