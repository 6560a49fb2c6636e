"""The one user-error type: a problem with the user's input (command line, config, data, checkpoint,
environment), not with the program. Every command catches it in one place (`simmim_fast.cli`),
prints one ``error: ...`` line (rank 0 only under a launcher) and exits with ``EXIT_USAGE``."""

EXIT_USAGE = 2


class UserError(Exception):
    """A bad input; the message names the problem (key, file, shape, dtype) and, where it helps, the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError, for callers that catch that)."""
