"""The one exception type users see: a one-line message that names the file and the problem."""


class MASRefineError(Exception):
    """A problem with the user's input or settings, reported as one line naming the file."""


class Cancelled(Exception):
    """Raised inside long work when the caller's progress callback asked to stop."""
