"""The one exception type that reaches users: the CLI prints its message on one line and exits with status 2."""


class UpcycleError(Exception):
    """A problem with the user's input or configuration; the message says what to do about it."""
