"""The one exception type for user mistakes."""


class MeshplanError(ValueError):
    """Bad user input. The message is one line that says what to change.

    The CLI prints it as a single line on stderr and exits with code 2; anything
    else that escapes is a bug in meshplan, not in the user's input.
    """
