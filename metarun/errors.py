"""One exception type for problems the user can fix; the CLI prints it as one line."""


class MetarunError(Exception):
    """Bad input: the message names the key or file and the fix."""


class RunInterrupted(MetarunError):
    """A stop signal (Ctrl-C, SIGTERM, SIGUSR1): the run stopped, saving its state where it
    could; the message says how to resume, the exit code is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind `err`, itself or along its causes: torch.save raises a RuntimeError
    whose cause is the full disk's OSError."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
