"""Registries: a name -> entry dict owned by the module that defines the entries.

A registry may also have *families*, names of the form `family:<rest>` (`torchvision:resnet18`),
whose entry receives `<rest>`; and any name of the form `package.module:attribute` names an entry by
its import path (`mypkg.nets:tiny_cnn`), imported where it is used, so user code needs no
registration step on a Ray cluster (a module outside the installed packages only with the opt-in of
`codistill.trust`: a job file alone cannot run code). Entries a program adds at run time (`MODELS["mine"] = fn` in a
notebook) are `extras()`: RayEngine ships them to its actors, so they work there too. Configs
validate names against the owning registry, looked up lazily (`codistill.config` imports no torch);
nothing outside the owner branches on a name. This module imports nothing of codistill but `errors`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from codistill.errors import ConfigError

__all__ = ["Registry", "lookup", "all_extras", "install_extras"]

T = TypeVar("T")
_REGISTRIES: dict[str, Registry] = {}  # kind -> registry


class Registry(dict[str, T], Generic[T]):
    """`{name: entry}` plus families `{prefix: (entry taking the rest, checker of the rest)}`."""

    def __init__(self, kind: str, entries: dict[str, T] | None = None):
        super().__init__(entries or {})
        self.kind = kind
        self.owner: str = sys._getframe(1).f_globals.get("__name__", "")  # the module that defines the entries
        self.builtin = frozenset(self)
        self.families: dict[str, tuple[Callable[[str], T], Callable[[str], None] | None]] = {}
        _REGISTRIES[kind] = self

    def family(self, prefix: str, make: Callable[[str], T], check: Callable[[str], None] | None = None) -> None:
        """Register `prefix:<rest>` names; `check(rest)` raises ValueError for a bad rest."""
        self.families[prefix] = (make, check)

    def allowed(self) -> str:
        names = [*(repr(n) for n in self), *(f"'{p}:<name>'" for p in self.families), "'package.module:attribute'"]
        return " | ".join(names)

    def _imported(self, name: str) -> T:
        from codistill.trust import installed_module, require_remote_code

        module, _, attr = name.partition(":")
        if not installed_module(module):  # importing it would run code that came with the job, not the machine
            require_remote_code(f"{module} is not an installed package, and importing it runs its code")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"an importable package.module:attribute ({type(e).__name__}: {e})") from None

    def check(self, name: str, field: str) -> None:
        """Raise ConfigError(field) unless `name` is registered, a valid family member or an import path."""
        if name in self:
            return
        prefix, sep, rest = name.partition(":")
        if not sep:
            raise ConfigError(field, name, self.allowed())
        try:
            if prefix in self.families:
                check = self.families[prefix][1]
                if check is not None:
                    check(rest)
            else:
                self._imported(name)
        except ValueError as e:
            raise ConfigError(field, name, str(e)) from None

    def get_entry(self, name: str, field: str) -> T:
        self.check(name, field)
        if name in self:
            return self[name]
        prefix, _, rest = name.partition(":")
        if prefix in self.families:
            return self.families[prefix][0](rest)
        return self._imported(name)

    def extras(self) -> dict[str, T]:
        """Entries added after the owning module defined the registry (user code at run time)."""
        return {k: v for k, v in self.items() if k not in self.builtin}


def lookup(module: str, attr: str) -> Registry:
    """The registry `attr` of `module`, imported on first use (configs sit below the registries)."""
    registry = getattr(importlib.import_module(module), attr)
    assert isinstance(registry, Registry), f"{module}.{attr} is not a Registry"
    return registry


def all_extras() -> dict[str, tuple[str, dict[str, Any]]]:
    """{registry kind: (owning module, its extras)} for every registry that has some (what RayEngine ships
    to its actors)."""
    return {kind: (r.owner, extras) for kind, r in _REGISTRIES.items() if (extras := r.extras())}


def install_extras(extras: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Add shipped extras (`all_extras()` of another process) to this process's registries, importing
    their owning modules first: an actor may not have imported them yet."""
    for kind, (owner, entries) in extras.items():
        if kind not in _REGISTRIES:
            importlib.import_module(owner)
        if kind not in _REGISTRIES:
            raise KeyError(f"module {owner} defines no registry of kind {kind!r} in this process")
        _REGISTRIES[kind].update(entries)
