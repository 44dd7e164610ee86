"""Registries: a name -> entry dict owned by the module that defines the entries.

A registry may also have *families*, names of the form `family:<rest>` (`torchvision:resnet18`),
whose entry receives `<rest>`. Configs validate names against the owning registry (looked up
lazily, so `codistill.config` imports no torch); nothing outside the owner branches on a name.
This module imports nothing of codistill but `errors`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from codistill.errors import ConfigError

__all__ = ["Registry", "lookup"]

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """`{name: entry}` plus families `{prefix: (entry taking the rest, checker of the rest)}`."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None):
        super().__init__(entries or {})
        self.kind = kind
        self.families: dict[str, tuple[Callable[[str], T], Callable[[str], None] | None]] = {}

    def family(self, prefix: str, make: Callable[[str], T], check: Callable[[str], None] | None = None) -> None:
        """Register `prefix:<rest>` names; `check(rest)` raises ValueError for a bad rest."""
        self.families[prefix] = (make, check)

    def allowed(self) -> str:
        return " | ".join([*(repr(n) for n in self), *(f"'{p}:<name>'" for p in self.families)])

    def check(self, name: str, field: str) -> None:
        """Raise ConfigError(field) unless `name` is registered (or a family name whose rest is valid)."""
        if name in self:
            return
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self.families:
            check = self.families[prefix][1]
            if check is not None:
                try:
                    check(rest)
                except ValueError as e:
                    raise ConfigError(field, name, str(e)) from None
            return
        raise ConfigError(field, name, self.allowed())

    def get_entry(self, name: str, field: str) -> T:
        self.check(name, field)
        if name in self:
            return self[name]
        prefix, _, rest = name.partition(":")
        return self.families[prefix][0](rest)


def lookup(module: str, attr: str) -> Registry:
    """The registry `attr` of `module`, imported on first use (configs sit below the registries)."""
    registry = getattr(importlib.import_module(module), attr)
    assert isinstance(registry, Registry), f"{module}.{attr} is not a Registry"
    return registry
