"""The one user-error type: a problem with the user's input (command line, config, data, checkpoint,
environment), not with the program. Every command catches it in one place (``simmim_fast.cli.run_main``),
prints one ``error: ...`` line (rank 0 only under a launcher) and exits with ``EXIT_USAGE``.

``UserError`` is a ``ValueError``, so code that catches ``ValueError`` around a library call keeps
working; ``MissingFileError`` is also a ``FileNotFoundError``.
"""

__all__ = ["EXIT_USAGE", "EXIT_NONFINITE", "exit_code_for_signal", "UserError", "MissingFileError", "RunStopped"]

# Exit statuses of every command (docs/ENGINE.md): 0 done; 2 bad input or environment (UserError);
# 3 training stopped on a non-finite loss; 128 + N stopped by signal N after saving a checkpoint
# (130 SIGINT, 143 SIGTERM, the shell's convention for a signal).
EXIT_USAGE = 2
EXIT_NONFINITE = 3


def exit_code_for_signal(signum: int) -> int:
    return 128 + int(signum)


class UserError(ValueError):
    """A bad input; the message names the problem (key, file, shape, dtype) and, where it helps, the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class RunStopped(Exception):
    """A run that stopped before its end on purpose (a non-finite loss, a signal); ``run_main`` prints the
    message as one line (``prefix`` + message, rank 0) and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int, prefix: str = "error: "):
        super().__init__(message)
        self.exit_code, self.prefix = exit_code, prefix
