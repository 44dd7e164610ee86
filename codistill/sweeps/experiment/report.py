"""The experiment's report: per arm and metric the spread over seeds, and the paired difference against
the first arm (same seed). Rendered for the console, as Markdown and as JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from codistill.sweeps.experiment.plan import ExperimentPlan
from codistill.sweeps.experiment.stats import Spread, paired_difference, spread
from codistill.table import text_table

__all__ = ["metric_columns", "build_report", "format_table", "to_markdown", "glance_markdown"]


def metric_columns(trials: Sequence[dict]) -> list[tuple[str, str]]:
    """(label, key) of what the report compares, from the finished trials' final metrics: each peer's test
    accuracy (classification) or validation loss (language models), their mean, the ensemble's, churn and
    mean pairwise KL."""
    finals = [t["final"] for t in trials if t.get("final")]
    if not finals:
        return []
    classification = any(f.get("ensemble_accuracy") is not None for f in finals)
    per_peer, unit = ("peer_accuracy", "accuracy") if classification else ("peer_loss", "val loss")
    names = list(dict.fromkeys(n for f in finals for n in (f.get(per_peer) or {})))
    cols = [(f"{n} {unit}", f"{per_peer}/{n}") for n in names]
    if classification:
        cols += [("mean peer accuracy", "mean_peer_accuracy"), ("ensemble accuracy", "ensemble_accuracy")]
    else:
        cols += [("mean peer val loss", "mean_peer_loss"), ("ensemble val loss", "ensemble_loss")]
    return [*cols, ("churn", "churn"), ("pairwise KL", "mean_pairwise_kl")]


def _value(final: dict, key: str) -> float | None:
    group, _, name = key.partition("/")
    v = (final.get(group) or {}).get(name) if name else final.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def build_report(plan: ExperimentPlan, trials: Sequence[dict], job_name: str, command: str) -> dict[str, Any]:
    """trials: {"arm", "seed", "final" (the trial's final metrics, None if it did not finish), "error"}."""
    columns = metric_columns(trials)
    by_arm: dict[str, dict[int, dict]] = {a.label: {} for a in plan.arms}
    for t in trials:
        if t.get("final") and t["arm"] in by_arm:
            by_arm[t["arm"]][int(t["seed"])] = t["final"]
    baseline = plan.arms[0].label
    arms = []
    for arm in plan.arms:
        metrics = {}
        for label, key in columns:
            per_seed = {s: _value(f, key) for s, f in sorted(by_arm[arm.label].items())}
            base = {s: _value(f, key) for s, f in by_arm[baseline].items()}
            delta = None if arm.label == baseline else paired_difference(per_seed, base).to_dict()
            metrics[label] = {
                "per_seed": per_seed,
                "spread": spread(list(per_seed.values())).to_dict(),
                "delta": delta,
            }
        arms.append(
            {
                "label": arm.label,
                "overrides": list(arm.overrides),
                "seeds": sorted(by_arm[arm.label]),
                "metrics": metrics,
            }
        )
    missing = [
        {"arm": t["arm"], "seed": t["seed"], "error": t.get("error") or "did not finish"}
        for t in trials
        if not t.get("final")
    ]
    return {
        "job": job_name,
        "command": command,
        "varied": list(plan.varied),
        "seeds": list(plan.seeds),
        "baseline": baseline,
        "metrics": [label for label, _ in columns],
        "arms": arms,
        "missing": missing,
        "interval": "95% Student-t interval of the mean over seeds; deltas are paired by seed",
    }


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _outside(delta: dict) -> bool:
    """Whether a paired difference's 95% interval excludes 0 (it has one: two seeds or more)."""
    return delta["low"] is not None and Spread(**delta).excludes_zero


def _rows(report: dict) -> list[list[str]]:
    rows = []
    for metric in report["metrics"]:
        for arm in report["arms"]:
            m = arm["metrics"][metric]
            s, d = m["spread"], m["delta"]
            sd = "" if s["sd"] is None else f" ± {s['sd']:.4f}"
            ci = "-" if s["low"] is None else f"[{s['low']:.4f}, {s['high']:.4f}]"
            if d is None:
                delta, dci, verdict = "baseline", "", ""
            else:
                delta = _num(d["mean"], signed=True)
                dci = "-" if d["low"] is None else f"[{d['low']:+.4f}, {d['high']:+.4f}]"
                verdict = "-" if d["low"] is None else ("outside" if _outside(d) else "inside")
            rows.append([metric, arm["label"], str(s["n"]), f"{_num(s['mean'])}{sd}", ci, delta, dci, verdict])
    return rows


HEADER = ["metric", "arm", "seeds", "mean ± sd", "95% CI", "Δ vs baseline", "95% CI of Δ", "seed spread"]


def format_table(report: dict) -> str:
    return text_table(HEADER, _rows(report))


def glance_markdown(report: dict) -> str:
    """One row per arm, one column per metric: `mean ± sd` and, beside it, the paired difference to the
    baseline with `*` when its 95% interval excludes 0 (outside the seed spread)."""
    header = ["arm", *report["metrics"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for arm in report["arms"]:
        cells = [arm["label"]]
        for metric in report["metrics"]:
            m = arm["metrics"][metric]
            s, d = m["spread"], m["delta"]
            cell = _num(s["mean"]) + ("" if s["sd"] is None else f" ± {s['sd']:.4f}")
            if d is not None and d["mean"] is not None:
                mark = "*" if _outside(d) else ""
                cell += f" ({d['mean']:+.4f}{mark})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(report: dict, plot_name: str | None = None) -> str:
    lines = [
        f"# Experiment: {report['job']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Varied: {', '.join(report['varied'])}; seeds {report['seeds']}; baseline arm `{report['baseline']}`. "
        f'{report["interval"]}; "inside" means the interval of the difference contains 0 (the effect is '
        "inside what the seeds move).",
        "",
        "At a glance (mean ± sd over seeds; in brackets the difference to the baseline paired by seed, `*` when its "
        "95% interval excludes 0):",
        "",
        glance_markdown(report),
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _rows(report)]
    lines += ["", "| arm | overrides |", "|---|---|"]
    lines += [f"| {a['label']} | `{' '.join(a['overrides']) or '(the job as is)'}` |" for a in report["arms"]]
    if report["missing"]:
        lines += ["", "Trials without a result:", ""]
        lines += [f"- {m['arm']} seed {m['seed']}: {m['error']}" for m in report["missing"]]
    if plot_name:
        lines += ["", f"![metrics against the arms]({plot_name})"]
    return "\n".join(lines) + "\n"
