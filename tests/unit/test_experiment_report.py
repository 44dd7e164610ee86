"""The experiment's arms, statistics and report, without Ray: trial records in, tables and files out."""

import json
import math

import pytest

from codistill.config import read_yaml
from codistill.config.overrides import parse_set
from codistill.errors import ResourcesError
from codistill.run_plan import prepare_run
from codistill.sweeps.experiment import build_report, fit_to_cluster, format_table, make_plan, spread, to_markdown
from codistill.sweeps.experiment.plot import plot_report
from codistill.sweeps.experiment.stats import paired_difference
from codistill.sweeps.trial import ARM_KEY, trial_overrides
from tests.helpers import ROOT

QUICKSTART = read_yaml(ROOT / "jobs" / "quickstart.yaml")


def test_vary_fields_cross_into_labelled_arms_and_seeds_follow_the_job_seed():
    plan = make_plan(QUICKSTART, ["loss.alpha=0,0.5", "loss.temperature=1,3"], [], seeds=3)
    assert [a.label for a in plan.arms] == [
        "alpha=0,temperature=1",
        "alpha=0,temperature=3",
        "alpha=0.5,temperature=1",
        "alpha=0.5,temperature=3",
    ]
    assert plan.arms[1].overrides == ("loss.alpha=0", "loss.temperature=3")
    assert plan.seeds == (0, 1, 2) and plan.num_trials == 12
    assert make_plan(QUICKSTART, ["loss.alpha=0"], [], seeds=2, first_seed=7).seeds == (7, 8)


def test_named_arms_set_several_fields_and_cross_with_vary():
    plan = make_plan(
        QUICKSTART,
        ["loss.temperature=1,3"],
        ["independent: loss.alpha=0", "checkpoint: exchange.mode=checkpoint exchange.period=50"],
        seeds=1,
    )
    assert [a.label for a in plan.arms][:2] == ["independent/temperature=1", "independent/temperature=3"]
    assert plan.arms[2].overrides == ("exchange.mode=checkpoint", "exchange.period=50", "loss.temperature=1")
    assert plan.varied == ("loss.temperature", "loss.alpha", "exchange.mode", "exchange.period")


@pytest.mark.parametrize(("vary", "arms"), [(["steps=40,80"], []), ([], ["as_is:", "short: steps=20"])])
def test_arms_that_set_steps_run_a_job_that_counts_epochs(vary, arms, tmp_path):
    """`steps` and `epochs` are exclusive: an arm that sets steps replaces the job's epochs, in the plan's check and
    in every trial's job (planned as the trial plans it)."""
    job = {**{k: v for k, v in QUICKSTART.items() if k != "steps"}, "epochs": 2}
    plan = make_plan(job, vary, arms, seeds=2)
    for arm in plan.arms:
        steps = dict(parse_set(arm.overrides)).get("steps")
        for seed in plan.seeds:
            sample = trial_overrides({ARM_KEY: arm.label, "seed": seed}, plan.arm_overrides())
            cfg = prepare_run(plan.base_raw, sample, run_dir=str(tmp_path)).config
            assert (cfg.steps, cfg.epochs, cfg.seed) == (steps, None if steps else 2, seed)


@pytest.mark.parametrize(
    ("vary", "arms", "seeds", "match"),
    [
        (["loss.alpah=0,1"], [], 3, r"--vary: arm 'alpah=0': loss.alpah: unknown key"),
        (["loss.alpha=0,2"], [], 3, r"arm 'alpha=2': loss.alpha: got 2.0; allowed"),
        (["loss.alpha"], [], 3, r"--vary: got 'loss.alpha'; allowed: FIELD=V1,V2"),
        (["loss.alpha=0,0"], [], 3, r"distinct values"),
        (["seed=1,2"], [], 3, r"--seeds N runs every arm"),
        ([], ["no colon loss.alpha=0"], 3, r"--arm: got 'no colon loss.alpha=0'; allowed: NAME: KEY=VALUE"),
        ([], ["a: loss.alpha=0", "a: loss.alpha=1"], 3, r"distinct arm names"),
        ([], [], 3, r"at least one FIELD=V1,V2"),
        (["loss.alpha=0,1"], [], 0, r"--seeds: got 0"),
    ],
)
def test_a_bad_experiment_fails_in_one_line_before_any_trial(vary, arms, seeds, match):
    with pytest.raises(ValueError, match=match):
        make_plan(QUICKSTART, vary, arms, seeds)


def test_values_with_commas_inside_brackets_stay_whole():
    plan = make_plan(QUICKSTART, ["data.synthetic_shape=[1,8,8],[3,8,8]"], [], seeds=1)
    assert [a.overrides for a in plan.arms] == [("data.synthetic_shape=[1,8,8]",), ("data.synthetic_shape=[3,8,8]",)]


def test_spread_is_the_student_t_interval_and_pairs_by_seed():
    s = spread([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2)
    assert s.low == pytest.approx(2 - half) and s.high == pytest.approx(2 + half)
    one = spread([0.5])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.low) and not one.excludes_zero
    # a shift every seed shares is far outside the spread of the seeds, though inside the unpaired intervals
    base = {0: 0.80, 1: 0.85, 2: 0.90}
    arm = {0: 0.81, 1: 0.86, 2: 0.91, 3: 0.5}  # seed 3 has no baseline: left out
    d = paired_difference(arm, base)
    assert d.n == 3 and d.mean == pytest.approx(0.01) and d.sd == pytest.approx(0, abs=1e-12)
    noisy = paired_difference({0: 0.81, 1: 0.84, 2: 0.92}, base)
    assert noisy.mean == pytest.approx(0.02 / 3) and not noisy.excludes_zero


def _trial(arm, seed, acc0, acc1, ens, churn=0.1, kl=0.2):
    return {
        "arm": arm,
        "seed": seed,
        "final": {
            "peer_accuracy": {"peer0-mlp": acc0, "peer1-cnn": acc1},
            "peer_loss": {"peer0-mlp": 0.5, "peer1-cnn": 0.4},
            "mean_peer_accuracy": (acc0 + acc1) / 2,
            "ensemble_accuracy": ens,
            "ensemble_loss": 0.3,
            "churn": churn,
            "mean_pairwise_kl": kl,
        },
        "error": None,
    }


def test_report_tables_every_metric_per_arm_with_paired_differences(tmp_path):
    plan = make_plan(QUICKSTART, ["loss.alpha=0,0.5"], [], seeds=3)
    trials = [
        _trial("alpha=0", 0, 0.90, 0.94, 0.95),
        _trial("alpha=0", 1, 0.91, 0.93, 0.95),
        _trial("alpha=0", 2, 0.92, 0.95, 0.96),
        _trial("alpha=0.5", 0, 0.93, 0.95, 0.96, churn=0.05),
        _trial("alpha=0.5", 1, 0.94, 0.94, 0.96, churn=0.04),
        {"arm": "alpha=0.5", "seed": 2, "final": None, "error": "RayTaskError: boom"},
    ]
    report = build_report(plan, trials, "quickstart", "python -m codistill.experiment ...")
    assert report["metrics"] == [
        "peer0-mlp accuracy",
        "peer1-cnn accuracy",
        "mean peer accuracy",
        "ensemble accuracy",
        "churn",
        "pairwise KL",
    ]
    base, arm = report["arms"]
    assert base["metrics"]["churn"]["delta"] is None and base["seeds"] == [0, 1, 2]
    mlp = arm["metrics"]["peer0-mlp accuracy"]
    assert mlp["spread"]["n"] == 2 and mlp["spread"]["mean"] == pytest.approx(0.935)
    assert mlp["delta"]["n"] == 2 and mlp["delta"]["mean"] == pytest.approx(0.03)  # seeds 0 and 1 only
    assert report["missing"] == [{"arm": "alpha=0.5", "seed": 2, "error": "RayTaskError: boom"}]
    table = format_table(report)
    assert "peer1-cnn accuracy" in table and "baseline" in table and "+0.0300" in table
    assert "inside" in table or "outside" in table
    md = to_markdown(report, "report.png")
    assert md.count("\n| ") >= 12 + 2 and "RayTaskError: boom" in md and "`loss.alpha=0.5`" in md
    assert "| alpha=0.5 | 0.9350 ± 0.0071 (+0.0300*) |" in md  # at a glance: mlp +0.03 on both seeds
    json.dumps(report)  # no NaN, no tuples keys: valid JSON
    assert plot_report(report, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 10_000


def test_language_model_reports_compare_validation_losses():
    plan = make_plan(QUICKSTART, ["loss.alpha=0,0.5"], [], seeds=1)
    final = {
        "peer_accuracy": {"a": None, "b": None},
        "peer_loss": {"a": 2.1, "b": 2.0},
        "ensemble_accuracy": None,
        "ensemble_loss": 1.9,
        "mean_peer_loss": 2.05,
        "churn": 0.3,
        "mean_pairwise_kl": 0.1,
    }
    trials = [{"arm": "alpha=0", "seed": 0, "final": final}, {"arm": "alpha=0.5", "seed": 0, "final": final}]
    report = build_report(plan, trials, "lm", "cmd")
    assert report["metrics"][:4] == ["a val loss", "b val loss", "mean peer val loss", "ensemble val loss"]
    assert report["arms"][1]["metrics"]["a val loss"]["delta"]["mean"] == 0


def test_trials_that_do_not_fit_the_cluster_reserve_less_and_keep_their_threads():
    fitted, note = fit_to_cluster(QUICKSTART, cluster_cpus=2, trial_cpus=0.1)
    assert fitted["resources"] == {"num_cpus": 0.95, "threads_per_peer": 1}
    assert note is not None and "needs 2.1 CPUs" in note
    assert fit_to_cluster(QUICKSTART, cluster_cpus=4, trial_cpus=0.1) == (QUICKSTART, None)
    own = {**QUICKSTART, "peers": [{"model": "mlp", "resources": {"num_cpus": 2}}, {"model": "cnn"}]}
    with pytest.raises(ResourcesError, match="one trial needs 3.1 CPUs"):
        fit_to_cluster(own, cluster_cpus=2, trial_cpus=0.1)


def test_every_package_is_in_the_distribution():
    """pyproject lists packages by hand: a package missing there is missing from every non-editable install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "codistill").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


def test_compute_matched_baselines_train_longer_alone_or_serve_the_ensemble():
    from codistill.sweeps.experiment.cli import shared_runs

    plan = make_plan(QUICKSTART, [], ["dml:", "independent: loss.alpha=0"], 2, baselines=["longer", "ensemble"])
    assert [(a.label, a.kind) for a in plan.arms] == [
        ("dml", "arm"),
        ("independent", "arm"),
        ("longer_x2", "longer"),
        ("ensemble", "ensemble"),
    ]
    assert plan.arms[2].overrides == ("loss.alpha=0", f"steps={2 * QUICKSTART['steps']}")
    # the ensemble baseline is the independent arm's job: it is scored from those runs, not run twice
    assert shared_runs(plan) == {
        "dml": "dml",
        "independent": "independent",
        "longer_x2": "longer_x2",
        "ensemble": "independent",
    }
    by_epochs = {**{k: v for k, v in QUICKSTART.items() if k != "steps"}, "epochs": 1.5}
    assert make_plan(by_epochs, [], ["dml:"], 1, baselines=["longer"]).arms[1].overrides == ("loss.alpha=0", "epochs=3")
    with pytest.raises(ValueError, match="--baseline: got"):
        make_plan(QUICKSTART, [], [], 1, baselines=["longer"])
    with pytest.raises(ValueError, match="each baseline once"):
        make_plan(QUICKSTART, [], ["dml:"], 1, baselines=["longer", "longer"])


def _summary(accuracies: dict[str, list[float]], steps: int, teacher_forwards: int = 0) -> dict:
    """A run's summary.json as records.enrich_final reads it: a round every 10 steps."""
    rounds = len(next(iter(accuracies.values())))
    return {
        "task": "classification",
        "peers": [
            {"name": n, "steps": steps, "teacher_forwards": teacher_forwards, "train_accuracy": 1.0} for n in accuracies
        ],
        "rounds": [
            {
                "step": 10 * (r + 1),
                "mean_peer_accuracy": sum(a[r] for a in accuracies.values()) / len(accuracies),
                "ensemble_accuracy": max(a[r] for a in accuracies.values()),
                "peers": {n: {"test_accuracy": a[r], "test_loss": 1 - a[r]} for n, a in accuracies.items()},
            }
            for r in range(rounds)
        ],
    }


def test_the_report_gives_best_and_final_the_compute_of_every_arm_and_what_is_served(tmp_path):
    from codistill.sweeps.experiment.records import enrich_final

    plan = make_plan(QUICKSTART, [], ["ckpt: exchange.mode=checkpoint"], 2, baselines=["longer", "ensemble"])
    curves = {  # arm -> peer accuracies per round: the checkpoint arm peaks at step 20 and then memorises
        "ckpt": ({"a": [0.5, 0.8, 0.7], "b": [0.6, 0.7, 0.75]}, 30, 40),
        "longer_x2": ({"a": [0.5, 0.6, 0.7, 0.8, 0.8, 0.8], "b": [0.5, 0.6, 0.7, 0.7, 0.7, 0.9]}, 60, 0),
        "ensemble": ({"a": [0.5, 0.6, 0.7], "b": [0.6, 0.6, 0.6]}, 30, 0),
    }
    trials = []
    for arm, (accs, steps, forwards) in curves.items():
        for seed in (0, 1):
            s = _summary({n: [v + 0.01 * seed for v in a] for n, a in accs.items()}, steps, forwards)
            last = s["rounds"][-1]
            final = {
                "peer_accuracy": {n: p["test_accuracy"] for n, p in last["peers"].items()},
                "mean_peer_accuracy": last["mean_peer_accuracy"],
                "ensemble_accuracy": last["ensemble_accuracy"],
                "churn": 0.1,
                "mean_pairwise_kl": 0.1,
            }
            trials.append({"arm": arm, "seed": seed, "final": enrich_final(final, s)})
    report = build_report(plan, trials, "quickstart", "cmd")
    assert "mean peer best accuracy" in report["metrics"] and "served accuracy" in report["metrics"]
    ckpt, longer, ensemble = report["arms"]
    assert ckpt["metrics"]["a best accuracy"]["per_seed"] == {0: 0.8, 1: 0.81}  # step 20's, not the final 0.7
    assert ckpt["metrics"]["a accuracy"]["per_seed"][0] == 0.7
    assert ckpt["metrics"]["best step"]["per_seed"][0] == (20 + 30) / 2
    assert ckpt["compute"] == {
        "num_peers": 2,
        "steps_per_peer": 30,
        "peer_steps": 60,
        "teacher_forwards": 80,
        "train_forwards": 140,
        "inference_models": 1,
    }
    assert longer["compute"]["peer_steps"] == 120 and longer["compute"]["train_forwards"] == 120
    assert ensemble["compute"]["inference_models"] == 2
    # what a deployment scores: one peer (the mean) for an arm, the ensemble for the ensemble baseline
    assert ckpt["metrics"]["served accuracy"]["per_seed"][0] == pytest.approx(0.725)
    assert ensemble["metrics"]["served accuracy"]["per_seed"][0] == pytest.approx(0.7)
    assert [p["step"] for p in longer["curve"]["points"]] == [10, 20, 30, 40, 50, 60]
    assert ensemble["curve"]["points"][-1]["mean"] == pytest.approx(0.705)  # the ensemble arm's curve: its ensemble
    assert ckpt["metrics"]["train accuracy"]["per_seed"][0] == 1.0
    md = to_markdown(report, "report.png")
    assert "| longer_x2 | 60 | 120 | 0 | 120 | 1 |" in md and "| ensemble | 30 | 60 | 0 | 60 | 2 |" in md
    assert "models served" in format_table(report)
    json.dumps(report)
    assert plot_report(report, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 10_000
