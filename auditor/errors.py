"""The one exception type for user-facing errors (bad input, bad usage).

The CLI turns an AuditError into a one-line message on stderr and exit code 2.
Anything else escaping is a bug in wmaudit, not a user error.
"""


class AuditError(Exception):
    """A problem with the user's input: message is shown as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
