"""A real Tune sweep on digits: 4 trials of whole two-peer runs, each an MLflow run under the sweep's."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml

from codistill import config as C
from codistill.sweeps.settings import load_sweep
from codistill.sweeps.tune import main
from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_bad_search_keys_fail_before_any_trial(tmp_path):
    sweep = yaml.safe_load((ROOT / "jobs" / "tune_temperature.yaml").read_text())
    sweep["search"] = {"loss.temprature": {"uniform": [1, 2]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ValueError, match=r"search.loss.temprature: loss.temprature: unknown key"):
        load_sweep(str(tmp_path / "s.yaml"), [])
    sweep["search"] = {"loss.alpha": {"uniform": [0.5, 3]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ValueError, match=r"loss.alpha: got 3.0; allowed: a number in \[0, 1\]"):
        load_sweep(str(tmp_path / "s.yaml"), [])


def test_sweep_runs_ranks_writes_best_job_and_resumes(ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [
        "steps=60",
        "eval_every=30",
        f"tune.storage_path={tmp_path}/tune",
        "tune.name=sweep",
        f"tracking.uri={uri}",
        "tune.num_samples=1",
        "search.loss.divergence={grid: [kl, js]}",
        # each trial has a data-parallel peer: its 2 workers are its own Ray Train run, not in the trial's group
        "peers.0.workers=2",
        "peers.0.resources={num_cpus: 0.25}",
    ]
    argv = ["--config", str(ROOT / "jobs" / "tune_temperature.yaml")] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "best job:" in out
    results = json.loads((tmp_path / "tune" / "sweep" / "sweep_results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 2 and all(t["complete"] for t in trials)  # 2 grid points x 1 sample
    metrics = [t["metric"] for t in trials]
    assert metrics == sorted(metrics, reverse=True) and all(0 < m <= 1 for m in metrics)
    assert {t["params"]["loss.divergence"] for t in trials} == {"kl", "js"}
    assert len({round(t["params"]["loss.temperature"], 6) for t in trials}) == 2
    # the best job is a runnable job file with the best trial's values
    best = C.load_job(results["best_job"])
    assert best.loss.temperature == pytest.approx(trials[0]["params"]["loss.temperature"])
    assert best.loss.divergence == trials[0]["params"]["loss.divergence"]
    # MLflow: one sweep run, a trial run per trial under it, each with its two peer runs
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tune_temperature"])
    sweep_id = results["mlflow_parent_run_id"]
    trial_runs = runs[runs["tags.mlflow.parentRunId"] == sweep_id]
    assert len(trial_runs) == 2
    peer_runs = runs[runs["tags.mlflow.parentRunId"].isin(set(trial_runs["run_id"]))]
    assert len(peer_runs) == 4
    # the best job is runnable
    from codistill.run import main as run_main

    assert (
        run_main(
            [
                "--config",
                results["best_job"],
                "--set",
                "steps=20",
                "--set",
                "tracking=none",
                "--set",  # the file as written, on one process (its workers key validated, not 20 s of Train)
                "engine=local",
                "--set",
                "peers.0.workers=1",
                "--output",
                str(tmp_path / "best"),
            ]
        )
        == 0
    )
    # --resume on the finished sweep restores it instead of starting again
    assert main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "tune" / "sweep" / "sweep_results.json").read_text())
    assert [t["trial"] for t in again["trials"]] == [t["trial"] for t in trials]
    assert again["mlflow_parent_run_id"] == sweep_id


def test_asha_stops_weak_trials_and_their_runs_end(ray_session, tmp_path):
    """ASHA fed by per-round reports: trials whose learning rate cannot learn in time are stopped at
    the first rung; the best job comes from a trial that ran to the end; stopped trials leave no
    MLflow run RUNNING and no peer actor behind."""
    import ray

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [
        "steps=60",
        "eval_every=20",
        f"tune.storage_path={tmp_path}/tune",
        "tune.name=asha",
        f"tracking.uri={uri}",
        "tune.num_samples=1",
        "tune.scheduler=asha",
        "tune.grace_period=1",
        "search.optim.lr={grid: [0.05, 0.00003, 0.00002, 0.00001]}",
    ]
    argv = ["--config", str(ROOT / "jobs" / "tune_temperature.yaml")] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "tune" / "asha" / "sweep_results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 4
    stopped = [t for t in trials if not t["complete"]]
    assert len(stopped) >= 2, trials  # the second pair reaches rung 1 after a good and a bad trial
    assert all(t["params"]["optim.lr"] < 0.001 for t in stopped)
    assert results["best"]["params"]["optim.lr"] == 0.05 and results["best"]["complete"]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tune_temperature"])
    assert "RUNNING" not in set(runs["status"]), runs[["tags.mlflow.runName", "status"]]
    assert (runs["status"] == "KILLED").sum() >= 3 * len(stopped)  # each stopped trial and its two peers
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("codistill-")]
    assert not alive, alive


def test_population_based_training_exploits_round_checkpoints(ray_session, tmp_path, capsys):
    """PBT over temperature and alpha: trials report a checkpoint every round; a weak trial takes a strong
    one's state and goes on with mutated values. Every trial still finishes its whole run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [
        # rounds of ~1 s: a trial's start-up (~15 s here) can differ by a second or two between the trials, and
        # PBT only exploits a trial that reports while the other is still running (rounds of 0.3 s failed in CI)
        "steps=200",
        "eval_every=50",
        f"tune.storage_path={tmp_path}/tune",
        "tune.name=pbt",
        f"tracking.uri={uri}",
        "tune.num_samples=1",
        "tune.scheduler=pbt",
        "tune.perturbation_interval=1",
        # one trial that learns and one that cannot (a grid: both values are tried), so the weak one is the
        # lower one at every report; sampled, both trials drew 0.05 and each was as often ahead as behind
        "search.optim.lr={grid: [0.05, 0.00001]}",
        # async PBT exploits only while both trials run: 2 x (0.1 + 2 x 0.4) CPUs leave room for what an
        # earlier test's actors still hold for a moment, so the second trial never waits for the first
        "resources.num_cpus=0.4",
    ]
    argv = ["--config", "tune_temperature"] + [a for s in sets for a in ("--set", s)]  # a bundled sweep by name
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "rank" in out
    results = json.loads((tmp_path / "tune" / "pbt" / "sweep_results.json").read_text())
    assert len(results["trials"]) == 2 and all(t["complete"] for t in results["trials"])
    policy = list((tmp_path / "tune" / "pbt").glob("pbt_global.txt"))
    assert policy and policy[0].read_text().strip(), "PBT never exploited a checkpoint"
    # an exploited trial resumed from another trial's round checkpoint and still ran to the end
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "tune" / "pbt").glob("*/run/summary.json")]
    assert len(summaries) == 2 and all(s["rounds"][-1]["step"] == 200 for s in summaries)
    assert any("resumed from its checkpoint" in e for s in summaries for e in s["events"])
    mlflow.set_tracking_uri(uri)
    sweep = mlflow.search_runs(experiment_names=["tune_temperature"], filter_string="tags.codistill.kind = 'sweep'")
    assert len(sweep) == 1 and sweep.iloc[0]["params.search.optim.lr"] == '{"grid": [0.05, 1e-05]}'
    assert sweep.iloc[0]["params.best.optim.lr"] in ("0.05", "1e-05")


def job_runs(client, experiment: str) -> list:
    """The (not deleted) trial runs of a sweep's experiment."""
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], "tags.codistill.kind = 'job'")


def test_an_interrupted_sweep_says_how_to_resume_and_resuming_leaves_one_run_per_trial(ray_session, tmp_path):
    """Ctrl-C while the second of two trials runs (one at a time; the first finished): exit 130, one line with
    the command that resumes it, no best job, the sweep's MLflow run KILLED. That command finishes the sweep: the
    finished trial is kept, the cut-off one (it had no checkpoint: engine local) starts over in runs that replace
    its first attempt's, so each trial has one run and each of its metrics once."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = ["steps=200", "eval_every=100", "engine=local", f"tune.storage_path={tmp_path}/tune", "tune.name=cut"]
    sets += [f"tracking.uri={uri}", "tune.num_samples=1", "tune.max_concurrent_trials=1"]
    sets += ["search.loss.divergence={grid: [kl, js]}"]
    argv = ["-m", "codistill.tune", "--config", "tune_temperature", *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    sweep = subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(uri), time.time() + 240
    while time.time() < deadline and sweep.poll() is None:
        status = [r.info.status for r in job_runs(client, "tune_temperature")]
        if status.count("FINISHED") == 1 and status.count("RUNNING") == 1:
            break
        time.sleep(0.5)
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=180)
    assert sweep.returncode == 130, err[-3000:]
    told = [line for line in err.splitlines() if "resume it with: " in line]
    assert len(told) == 1 and told[0].startswith("sweep interrupted (1 of 2 trials finished)"), err[-3000:]
    assert "Tuner.restore" not in err
    folder = tmp_path / "tune" / "cut"
    assert not (folder / "best_job.yaml").exists()
    sweep_id = json.loads((folder / "sweep.json").read_text())["mlflow_run_id"]
    assert client.get_run(sweep_id).info.status == "KILLED"
    finished = {r.info.run_id for r in job_runs(client, "tune_temperature") if r.info.status == "FINISHED"}

    again = shlex.split(told[0].split("resume it with: ")[1])
    assert again[:3] == ["python", "-m", "codistill.tune"] and again[-1] == "--resume"
    r = subprocess.run([sys.executable, *again[1:]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "best job:" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert (folder / "best_job.yaml").exists() and client.get_run(sweep_id).info.status == "FINISHED"
    trials = job_runs(client, "tune_temperature")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}, [t.info for t in trials]
    assert finished < {t.info.run_id for t in trials}  # the trial that had finished was not run again
    experiment = trials[0].info.experiment_id
    for t in trials:
        peers = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{t.info.run_id}'")
        assert len(peers) == 2 and {p.info.status for p in peers} == {"FINISHED"}
        for key in ("ensemble_accuracy", "test_accuracy_peer0-mlp"):
            steps = [m.step for m in client.get_metric_history(t.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)  # each metric once
