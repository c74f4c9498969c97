"""The errors maisi2 raises for what a user can fix, and the one type its front ends catch.

`maisi2 ...` (maisi2.cli) and the web app (maisi2.web) report a `Maisi2Error` as one line that
says what to do, and let every other exception through with its traceback: a KeyError or
RuntimeError from deep inside is a bug to see, not a message to hide. Each subclass is also the
built-in exception its callers would expect (an `InvalidInput` is a ValueError), so library code
and tests that catch the built-in keep working.
"""

from __future__ import annotations

__all__ = ["Maisi2Error", "InvalidInput", "MissingInput", "OutputExists", "UnknownName", "CannotRun"]


class Maisi2Error(Exception):
    """Something the user can fix: its message says what and how."""


class InvalidInput(Maisi2Error, ValueError):
    """A value, file content or request that maisi2 refuses (checked before any heavy work)."""


class MissingInput(Maisi2Error, FileNotFoundError):
    """A file or folder the request names does not exist (or lacks what it must hold)."""


class OutputExists(Maisi2Error, FileExistsError):
    """An output would overwrite an existing file without --overwrite."""


class UnknownName(Maisi2Error, KeyError):
    """A name (label, organ, preset entry) that is not in its table; the message lists what is."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message
        return str(self.args[0]) if self.args else ""


class CannotRun(Maisi2Error, RuntimeError):
    """The request is valid but cannot run here or any further (no CUDA device, a diverged run)."""
