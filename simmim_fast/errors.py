"""The one user-error type: a problem with the user's input (command line, config, data, checkpoint,
environment), not with the program. Every command catches it in one place (``simmim_fast.cli.run_main``),
prints one ``error: ...`` line (rank 0 only under a launcher) and exits with ``EXIT_USAGE``.

``UserError`` is a ``ValueError``, so code that catches ``ValueError`` around a library call keeps
working; ``MissingFileError`` is also a ``FileNotFoundError``.
"""

__all__ = ["EXIT_USAGE", "UserError", "MissingFileError"]

EXIT_USAGE = 2


class UserError(ValueError):
    """A bad input; the message names the problem (key, file, shape, dtype) and, where it helps, the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""
