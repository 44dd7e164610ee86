"""The experiment's report: per arm and metric the spread over seeds, and the paired difference against
the first arm (same seed). Rendered for the console, as Markdown and as JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from codistill.sweeps.experiment.plan import ExperimentPlan
from codistill.sweeps.experiment.stats import Spread, paired_difference, spread
from codistill.table import text_table

__all__ = ["metric_columns", "build_report", "compute_markdown", "format_table", "to_markdown", "glance_markdown"]


def metric_columns(trials: Sequence[dict], served: bool = False) -> list[tuple[str, str]]:
    """(label, key) of what the report compares, from the finished trials' final metrics: each peer's test
    accuracy (classification) or validation loss (language models) at the end and at its best round, their
    means and the mean step of the best rounds, the ensemble's, what is served (`served`: with a compute-matched
    baseline, the ensemble's for the ensemble arm, else the mean peer's), churn, mean pairwise KL and the peers'
    mean training accuracy (data.train_eval; on the clean labels too with data.label_noise)."""
    finals = [t["final"] for t in trials if t.get("final")]
    if not finals:
        return []
    classification = any(f.get("ensemble_accuracy") is not None for f in finals)
    per_peer, unit = ("peer_accuracy", "accuracy") if classification else ("peer_loss", "val loss")
    names = list(dict.fromkeys(n for f in finals for n in (f.get(per_peer) or {})))
    mean, ensemble = ("mean_peer_accuracy", "ensemble_accuracy")
    if not classification:
        mean, ensemble = ("mean_peer_loss", "ensemble_loss")
    cols = [(f"{n} {unit}", f"{per_peer}/{n}") for n in names] + [(f"mean peer {unit}", mean)]
    if any(f.get("peer_best") for f in finals):
        cols += [(f"{n} best {unit}", f"peer_best/{n}") for n in names]
        cols += [(f"mean peer best {unit}", "mean_peer_best"), ("best step", "best_step")]
    cols.append((f"ensemble {unit}", ensemble))
    if served:
        cols.append((f"served {unit}", "served"))
    cols += [("churn", "churn"), ("pairwise KL", "mean_pairwise_kl")]
    if classification:
        train = [
            ("train accuracy", "mean_peer_train_accuracy"),
            ("train accuracy (clean)", "mean_peer_train_accuracy_clean"),
        ]
        cols += [(label, key) for label, key in train if any(f.get(key) is not None for f in finals)]
    return cols


def _value(final: dict, key: str) -> float | None:
    group, _, name = key.partition("/")
    v = (final.get(group) or {}).get(name) if name else final.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _served(final: dict, kind: str) -> float | None:
    """What a deployment of the arm scores: the ensemble of its peers (ensemble baseline) or one peer (the mean)."""
    classification = final.get("ensemble_accuracy") is not None
    if kind == "ensemble":
        return final["ensemble_accuracy"] if classification else final.get("ensemble_loss")
    return final.get("mean_peer_accuracy") if classification else final.get("mean_peer_loss")


def _compute(finals: list[dict], kind: str) -> dict[str, Any] | None:
    """The arm's compute as its runs counted it (the same for every seed; the first one's), with the models
    served at inference."""
    counted = [f["compute"] for f in finals if f.get("compute")]
    if not counted:
        return None
    return {**counted[0], "inference_models": counted[0]["num_peers"] if kind == "ensemble" else 1}


def _curve(finals: list[dict], key: str) -> list[dict[str, Any]]:
    """Per evaluated step, the spread over seeds of a round metric (the plot's band)."""
    by_step: dict[int, list[float]] = {}
    for f in finals:
        for point in f.get("curve") or []:
            if point.get(key) is not None:
                by_step.setdefault(int(point["step"]), []).append(float(point[key]))
    out = []
    for step, values in sorted(by_step.items()):
        sp = spread(values)
        out.append({"step": step, **sp.to_dict(), "min": min(values), "max": max(values)})
    return out


def _curve_key(mean_key: str, kind: str) -> str:
    """The round metric an arm's curve follows: what it serves (the ensemble's for the ensemble baseline)."""
    return mean_key.replace("mean_peer", "ensemble") if kind == "ensemble" else mean_key


def build_report(plan: ExperimentPlan, trials: Sequence[dict], job_name: str, command: str) -> dict[str, Any]:
    """trials: {"arm", "seed", "final" (the trial's final metrics, records.enrich_final's keys where its
    summary was read; None if it did not finish), "error"}."""
    kinds = {a.label: a.kind for a in plan.arms}
    served = any(k != "arm" for k in kinds.values())
    by_arm: dict[str, dict[int, dict]] = {a.label: {} for a in plan.arms}
    for t in trials:
        if t.get("final") and t["arm"] in by_arm:
            by_arm[t["arm"]][int(t["seed"])] = {**t["final"], "served": _served(t["final"], kinds[t["arm"]])}
    columns = metric_columns(trials, served)
    finals = [f for runs in by_arm.values() for f in runs.values()]
    classification = any(f.get("ensemble_accuracy") is not None for f in finals)
    curve_key = "mean_peer_accuracy" if classification else "mean_peer_loss"
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
        runs = list(by_arm[arm.label].values())
        arms.append(
            {
                "label": arm.label,
                "kind": arm.kind,
                "overrides": list(arm.overrides),
                "seeds": sorted(by_arm[arm.label]),
                "metrics": metrics,
                "compute": _compute(runs, arm.kind),
                "curve": {"metric": curve_key, "points": _curve(runs, _curve_key(curve_key, arm.kind))},
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


COMPUTE_HEADER = ["arm", "steps per peer", "peer-steps", "teacher forwards", "training forwards", "models served"]
COMPUTE_KEYS = ("steps_per_peer", "peer_steps", "teacher_forwards", "train_forwards", "inference_models")
HEADER = ["metric", "arm", "seeds", "mean ± sd", "95% CI", "Δ vs baseline", "95% CI of Δ", "seed spread"]


def format_table(report: dict) -> str:
    table = text_table(HEADER, _rows(report))
    compute = [
        [a["label"], *(f"{a['compute'][k]:,}" for k in COMPUTE_KEYS)] for a in report["arms"] if a.get("compute")
    ]
    return table + ("\n" + text_table(COMPUTE_HEADER, compute) if compute else "")


def glance_markdown(report: dict, metrics: Sequence[str] | None = None) -> str:
    """One row per arm, one column per metric (all, or `metrics`): `mean ± sd` and, beside it, the paired
    difference to the baseline with `*` when its 95% interval excludes 0 (outside the seed spread)."""
    chosen = list(report["metrics"] if metrics is None else [m for m in metrics if m in report["metrics"]])
    header = ["arm", *chosen]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for arm in report["arms"]:
        cells = [arm["label"]]
        for metric in chosen:
            m = arm["metrics"][metric]
            s, d = m["spread"], m["delta"]
            digits = 0 if metric == "best step" else 4  # a step is a whole number
            cell = f"{s['mean']:.{digits}f}" if s["mean"] is not None else "-"
            cell += "" if s["sd"] is None else f" ± {s['sd']:.{digits}f}"
            if d is not None and d["mean"] is not None:
                mark = "*" if _outside(d) else ""
                cell += f" ({d['mean']:+.{digits}f}{mark})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compute_markdown(report: dict) -> str:
    """Each arm's compute as its runs counted it, in batches of a peer's size: optimizer steps per peer and in
    all, forward passes of local teachers and of everything while training, and the models served at inference."""
    lines = ["| " + " | ".join(COMPUTE_HEADER) + " |", "|" + "|".join("---" for _ in COMPUTE_HEADER) + "|"]
    for arm in report["arms"]:
        c = arm.get("compute")
        if not c:
            continue
        lines.append("| " + " | ".join([arm["label"], *(f"{c[k]:,}" for k in COMPUTE_KEYS)]) + " |")
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
        "Compute (counted by the runs; forward passes in batches of a peer's size):",
        "",
        compute_markdown(report),
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
