"""The one exception type for mistakes a user can fix.

Raise `CnnlabError` where the problem is found, with a message that says what is
wrong and how to fix it. The command line prints it as one line and exits 2.
Programming errors (bugs) keep raising their ordinary exceptions.
"""


class CnnlabError(Exception):
    """A user-facing error: bad input, missing data, an impossible option."""
