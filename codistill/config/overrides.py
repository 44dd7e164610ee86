"""One way to change a job: `apply(raw, {dotted.key: value})`.

Every front door changes a job through it: `--set KEY=VALUE` on the command lines (`parse_set`
turns the strings into values as YAML does), `codistill.train(job, **overrides)` (nested sections
as dicts become dotted keys), the arms of `codistill.experiment` and the samples of a Tune sweep.

Setting one field of an exclusive pair (`RunConfig.EXCLUSIVE`: `steps` and `epochs`) clears the
other where the job had it, so `--set steps=40` on a job with `epochs` runs 40 steps. Setting both
in one call is still an error: the user asked for two things that cannot both hold.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from codistill.config.schema import DEFAULT_PEER_MODELS, RunConfig
from codistill.errors import ConfigError

__all__ = ["apply", "default_raw_peers", "dotted", "parse_set"]

Overrides = Mapping[str, Any] | Iterable[tuple[str, Any]]


def _pairs(overrides: Overrides) -> list[tuple[str, Any]]:
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    return [(str(k).strip(), v) for k, v in items]


def _exclusive_with(path: str) -> tuple[str, ...]:
    """The dotted fields that setting `path` clears (its partners in an exclusive pair)."""
    head, _, name = path.rpartition(".")
    prefix = f"{head}." if head else ""
    for pair in RunConfig.EXCLUSIVE if not head else ():
        if name in pair:
            return tuple(prefix + other for other in pair if other != name)
    return ()


def default_raw_peers() -> list[dict]:
    """The peers of a job that names none, as a job file would list them."""
    return [{"model": m} for m in DEFAULT_PEER_MODELS]


def _node(raw: dict, parts: list[str], path: str, create: bool) -> Any:
    """The mapping that holds the last part of a dotted key (created on the way when `create`)."""
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(here, message=f"no such peer index; allowed: 0..{len(node) - 1}")
            if isinstance(node[int(part)], str):  # `- resnet20` shorthand
                node[int(part)] = {"model": node[int(part)]}
            node = node[int(part)]
            continue
        if not create and part not in node:
            return None
        if part == "peers" and part not in node:
            node[part] = default_raw_peers()
        if part == "tracking" and isinstance(node.get(part), str):  # `tracking: none` shorthand
            node[part] = {"backend": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(here, message=f"is a value, not a section; cannot set {path}")
    if isinstance(node, list):
        raise ConfigError(path, message="set a peer's field, e.g. peers.0.model=cnn")
    return node


def apply(raw: dict, overrides: Overrides) -> dict:
    """A copy of the raw job mapping with each dotted key set to its (already typed) value, in order.

    A key of an exclusive pair that is set to a value clears its partner when the job had the partner
    before this call (module docstring)."""
    raw = copy.deepcopy(raw)
    pairs = _pairs(overrides)
    given = {path for path, _ in pairs}
    for path, value in pairs:
        if not path:
            raise ConfigError("--set", path, "a dotted job key, e.g. loss.alpha")
        parts = path.split(".")
        _node(raw, parts, path, create=True)[parts[-1]] = value
        if value is None:
            continue
        for partner in _exclusive_with(path):
            if partner in given:  # both set here: the schema names the conflict
                continue
            holder = _node(raw, partner.split("."), partner, create=False)
            if isinstance(holder, dict):
                holder.pop(partner.rsplit(".", 1)[-1], None)
    return raw


def parse_set(items: Iterable[str]) -> list[tuple[str, Any]]:
    """`KEY=VALUE` strings (the command lines' --set) as (dotted key, value) pairs. Values are read as YAML
    reads them ("[1, 2]", "null", "3e-4" become values; plain strings stay strings)."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise ConfigError("--set", item, "KEY=VALUE with a dotted key, e.g. loss.alpha=0")
        key, text = item.split("=", 1)
        text = text.strip()
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def dotted(nested: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Overrides given as fields with nested sections as dicts (`loss={"alpha": 0}`) as dotted pairs
    (`loss.alpha`); a dict merges into the section it names, any other value replaces."""
    out: list[tuple[str, Any]] = []
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += dotted(value, f"{path}.")
        elif isinstance(value, Mapping):
            continue  # an empty section changes nothing (as merging it did)
        else:
            out.append((path, value))
    return out
