"""What an experiment compares: arms (one value of the varied fields each, or a named set of overrides)
crossed with seeds. The first arm is the baseline every other arm is compared with, seed by seed.

Two compute-matched baselines can be added (`--baseline`), after the job's own arms:
- `longer`: every peer trained alone (loss.alpha=0) for N times the job's steps (N peers): each model gets the
  compute the whole co-distilled group spent;
- `ensemble`: the peers trained alone for the job's steps and served together, scored by the ensemble's metric
  (N models at inference).
Distillation Scaling Laws (Busbridge et al., ICML 2025) is why: when the teacher has to be trained too, plain
training of one model at the same compute can win."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from codistill.config import build
from codistill.config.overrides import apply, parse_set
from codistill.errors import ConfigError

__all__ = ["BASELINES", "Arm", "ExperimentPlan", "baseline_arm", "make_plan", "parse_vary", "parse_arm", "split_values"]

BASELINES = ("longer", "ensemble")
"""The compute-matched baselines --baseline adds (module docstring)."""


@dataclass(frozen=True, slots=True)
class Arm:
    label: str
    """What the arm tries, as the report shows it: `alpha=0.5`, or the name given with --arm."""
    overrides: tuple[str, ...]
    """`dotted.key=value` items, as --set takes them."""
    kind: str = "arm"
    """`arm`, or the compute-matched baseline it is (BASELINES): `ensemble` is scored by the ensemble's metric."""


@dataclass(frozen=True, slots=True)
class ExperimentPlan:
    base_raw: dict
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    varied: tuple[str, ...]
    """The dotted fields the arms set (the plot's axis)."""

    def __post_init__(self) -> None:
        if not self.arms:
            raise ConfigError("--vary", None, "at least one FIELD=V1,V2 (or --arm NAME: KEY=VALUE ...)")
        labels = [a.label for a in self.arms]
        if len(set(labels)) != len(labels):
            raise ConfigError("--arm", labels, "distinct arm names")
        if not self.seeds:
            raise ConfigError("--seeds", 0, "an integer >= 1")

    @property
    def num_trials(self) -> int:
        return len(self.arms) * len(self.seeds)

    def arm_overrides(self) -> dict[str, list[str]]:
        return {a.label: list(a.overrides) for a in self.arms}


def split_values(text: str) -> list[str]:
    """`0,0.5,[1,2]` -> ["0", "0.5", "[1,2]"]: commas inside brackets or braces belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_vary(item: str) -> tuple[str, list[str]]:
    """`loss.alpha=0,0.5` -> ("loss.alpha", ["0", "0.5"])."""
    key, sep, values = item.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError("--vary", item, "FIELD=V1,V2[,...] with a dotted job field, e.g. loss.alpha=0,0.5")
    parts = split_values(values)
    if any(not p for p in parts):
        raise ConfigError("--vary", item, "comma-separated values, none empty")
    if len(set(parts)) != len(parts):
        raise ConfigError("--vary", item, "distinct values")
    return key, parts


def parse_arm(item: str) -> Arm:
    """`dml_T3: loss.temperature=3 exchange.mode=logits` -> Arm("dml_T3", (...)); `NAME:` alone is the job as is."""
    label, sep, rest = item.partition(":")
    label = label.strip()
    if not sep or not label or "=" in label:
        raise ConfigError("--arm", item, "NAME: KEY=VALUE [KEY=VALUE ...], e.g. 'dml_T3: loss.temperature=3'")
    overrides = tuple(rest.split())
    for o in overrides:
        if "=" not in o:
            raise ConfigError("--arm", item, "NAME: KEY=VALUE [KEY=VALUE ...] (no spaces inside a value)")
    return Arm(label, overrides)


def baseline_arm(base_raw: dict, kind: str) -> Arm:
    """The arm of a compute-matched baseline (module docstring), from the job as the experiment gives it."""
    if kind not in BASELINES:
        raise ConfigError("--baseline", kind, " or ".join(BASELINES))
    cfg = build(base_raw)
    if kind == "ensemble":
        return Arm("ensemble", ("loss.alpha=0",), kind)
    n = cfg.num_peers
    length = f"steps={cfg.steps * n}" if cfg.steps is not None else f"epochs={cfg.epochs * n:g}"  # type: ignore[operator]
    return Arm(f"longer_x{n}", ("loss.alpha=0", length), kind)


def _short(keys: list[str]) -> dict[str, str]:
    """Each field's last part (`loss.alpha` -> `alpha`) unless two fields share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def make_plan(
    base_raw: dict,
    vary: list[str],
    arms: list[str],
    seeds: int,
    first_seed: int | None = None,
    baselines: list[str] = (),  # type: ignore[assignment]
) -> ExperimentPlan:
    """Arms = the named --arm sets (in order) crossed with the grid of --vary values (in order), then the
    compute-matched `baselines`; seeds are first_seed (default: the job's seed) and the next ones. Every trial's
    job is built here, so an unknown field or an impossible value fails before any trial starts."""
    if seeds < 1:
        raise ConfigError("--seeds", seeds, "an integer >= 1")
    varied = [parse_vary(v) for v in vary]
    keys = [k for k, _ in varied]
    if len(set(keys)) != len(keys):
        raise ConfigError("--vary", keys, "each field once")
    named = [parse_arm(a) for a in arms]
    touched = keys + [o.split("=", 1)[0] for a in named for o in a.overrides]
    if "seed" in touched:
        raise ConfigError("--vary", "seed", "job fields other than seed (--seeds N runs every arm with N seeds)")
    short = _short(keys)
    grid = [
        Arm(
            ",".join(f"{short[k]}={v}" for k, v in zip(keys, values)),
            tuple(f"{k}={v}" for k, v in zip(keys, values)),
        )
        for values in itertools.product(*(vals for _, vals in varied))
        if varied
    ]
    if named and grid:
        combined = [Arm(f"{a.label}/{g.label}", a.overrides + g.overrides) for a in named for g in grid]
    else:
        combined = named or grid
    if baselines and not combined:
        raise ConfigError("--baseline", list(baselines), "beside an --arm or --vary (what it is compared with)")
    if len(set(baselines)) != len(baselines):
        raise ConfigError("--baseline", list(baselines), "each baseline once")
    combined = [*combined, *(baseline_arm(base_raw, b) for b in baselines)]
    start = int(base_raw.get("seed", 0)) if first_seed is None else first_seed
    plan = ExperimentPlan(
        base_raw=base_raw,
        arms=tuple(combined),
        seeds=tuple(range(start, start + seeds)),
        varied=tuple(dict.fromkeys(touched)),
    )
    for arm in plan.arms:
        try:
            build(apply(base_raw, parse_set(arm.overrides)))
        except ConfigError as e:
            raise ConfigError("--vary" if not named else "--arm", message=f"arm {arm.label!r}: {e}") from None
    return plan
