"""Failures a user caused or can fix.

The CLI prints a `CodistillError` as one `error:` line and exits non-zero; anything else (a bug,
CUDA out of memory) keeps its traceback. Each subclass also derives from the builtin a caller
would catch without knowing codistill (`ValueError` for bad input, `RuntimeError` for a run that
could not go on).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CodistillError", "ConfigError", "ResourcesError"]


class CodistillError(Exception):
    """A failure the user caused or can fix: its message is the whole story, in one line."""


class ConfigError(CodistillError, ValueError):
    """A bad job value. `field` is the dotted path (`loss.temperature`); a section that does not know
    where it sits in a job names itself (`optim.lr`) and the parser moves it (`relocated`)."""

    def __init__(self, field: str, value: Any = None, allowed: str = "", *, message: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        self.detail = message
        text = f"{field}: {message}" if message is not None else f"{field}: got {value!r}; allowed: {allowed}"
        super().__init__(text)

    def relocated(self, section: str, path: str) -> ConfigError:
        """The same error with `section.` replaced by `path.` (`optim.lr` -> `peers.1.optim.lr`)."""
        if not section or not path or path == section or not self.field.startswith(section + "."):
            return self
        return ConfigError(path + self.field[len(section) :], self.value, self.allowed, message=self.detail)


class ResourcesError(CodistillError, RuntimeError):
    """The cluster cannot give what the job asks for."""
