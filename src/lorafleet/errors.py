"""The one exception type that reaches users: a one-line message, exit code 2 on the CLI."""


class LorafleetError(Exception):
    """A problem with the user's input (a file, a name, an option), stated in one line."""

    def __init__(self, message: str):
        # Keep it to one line: the CLI prints it as-is on stderr.
        super().__init__(" ".join(str(message).split()))
