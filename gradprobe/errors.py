"""The one exception type for "the user's input is wrong".

Raised where the problem is found, with the fix in its message; the CLI alone turns it into a
one-line error and exit code 2.
"""


class UserInputError(Exception):
    """Bad input from the user: the message names the problem and how to fix it."""
