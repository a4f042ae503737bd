"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``str(error)`` and exits with status 2 (``exit_on_error``); nothing else should reach the user as a
traceback.
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


@contextmanager
def exit_on_error():
    """For entry points: a ``LatentupError`` prints ``error: <message>`` to stderr and exits with status 2."""
    try:
        yield
    except LatentupError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
