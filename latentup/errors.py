"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``str(error)`` and exits with status 2 (``exit_on_error``, which also words file-system errors so);
nothing else should reach the user as a traceback.
"""

import sys
from contextlib import contextmanager


class LatentupError(Exception):
    """Base class for every error caused by user input (files, values, weights)."""


class InputError(LatentupError):
    """A missing, unreadable or unusable input (image, latent, task file)."""


class ConfigError(LatentupError):
    """A bad configuration value (steps < 1, unknown sampler, ...)."""


class WeightsNotFoundError(LatentupError):
    """Weights that could not be located on disk."""


class WeightsMismatchError(LatentupError):
    """A state dict whose keys or shapes do not fit the module it is loaded into."""


def user_message(error: BaseException) -> str | None:
    """The one line to show for an error the user can fix, else None: a LatentupError, also one raised as the cause
    of another (Hydra's ``instantiate`` wraps what it calls), or an OSError naming a file (a read-only or missing
    folder, a folder where a file should be, no permission)."""
    cause = error
    while cause is not None:
        if isinstance(cause, LatentupError):
            return str(cause)
        cause = cause.__cause__
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or type(error).__name__}: check the path and its permissions"
    return None


@contextmanager
def exit_on_error():
    """For entry points: an error with a :func:`user_message` prints ``error: <message>`` to stderr and exits with
    status 2; any other error propagates."""
    try:
        yield
    except Exception as error:
        message = user_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
