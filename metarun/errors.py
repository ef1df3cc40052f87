"""One exception type for problems the user can fix; the CLI prints it as one line."""


class MetarunError(Exception):
    """Bad input: the message names the key or file and the fix."""


class RunInterrupted(MetarunError):
    """Ctrl-C: the run saved its state and stopped; the message says how to resume."""

    exit_code = 130
