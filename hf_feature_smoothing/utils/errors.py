"""The one error type of dataset-scale runs: a message naming the file, option or value, and the fix."""


class RunError(Exception):
    """A run cannot start or continue (locked output, changed parameters, corrupt rows, unreadable source...).
    The CLI prints the message and exits with status 1."""
