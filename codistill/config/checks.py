"""What every config section shares: bounds, the check that raises a ConfigError naming the field, safe names."""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

from codistill.errors import ConfigError
from codistill.registry import lookup

MAX_STEPS = 10**9
"""Upper bound on a run's length in steps (a typo such as 10**12 steps is refused, not planned)."""
MAX_ROUNDS = 100_000
"""Upper bound on a run's rounds (steps / eval_every): each round evaluates every peer on the test set and is
a record in progress.json, the summary and MLflow, so 10**9 steps at eval_every 1 is refused, not planned."""


def check_rounds(steps: int, eval_every: int, steps_field: str = "steps") -> None:
    """ConfigError unless `steps` (from `steps_field`) make at most MAX_ROUNDS rounds of `eval_every` steps."""
    check(1 <= steps <= MAX_STEPS, steps_field, steps, f"at most {MAX_STEPS} steps")
    if -(-steps // eval_every) > MAX_ROUNDS:
        raise ConfigError(
            "eval_every",
            eval_every,
            f"at least {-(-steps // MAX_ROUNDS)} for {steps} steps (a run has at most {MAX_ROUNDS} rounds: each "
            "evaluates every peer and is a record in progress.json and MLflow)",
        )


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class _Section:
    """Errors name the field under the section (`loss.temperature`); the parser moves them to where
    the section sits in a job (`peers.1.optim.lr` for a peer's `optim.lr`)."""

    __slots__ = ()
    SECTION: ClassVar[str] = ""

    def _field(self, name: str) -> str:
        return f"{self.SECTION}.{name}" if self.SECTION else name

    def _check(self, ok: bool, name: str, value: Any, allowed: str) -> None:
        check(ok, self._field(name), value, allowed)

    def _registered(self, module: str, registry: str, value: str, name: str) -> None:
        lookup(module, registry).check(value, self._field(name))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '_', '-', '.', '+', starting with a letter or digit (no path separators)"
"""Names that become one path component (a run, a sweep, an experiment, a peer): never `..` or `a/b`."""


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name)) and ".." not in name
