"""`python -m codistill.run` end to end (LocalEngine here; the Ray engine has its own tests)."""

import json
import subprocess
import sys

import pytest

from codistill.run import main


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["loss.alpha=0"],
        ["loss.divergence=reverse_kl"],
        ["loss.divergence=js"],
        ["loss.divergence=mse"],
        ["loss.divergence=kl", "loss.zscore=true"],
        ["exchange.mode=checkpoint", "exchange.period=10", "loss.teacher_reduce=probs"],
    ],
)
def test_quickstart_variants_write_summary(tmp_path, extra, capsys):
    sets = ["engine=local", "steps=30", "eval_every=15", "tracking=none", *extra]
    argv = [a for s in sets for a in ("--set", s)] + ["--output", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ensemble" in out and "summary:" in out and "round   1" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert [p["name"] for p in s["peers"]] == ["peer0-mlp", "peer1-cnn"]
    for p in s["peers"]:
        assert p["steps"] == 30 and 0 <= p["test_accuracy"] <= 1 and p["steps_per_s"] > 0 and p["test_loss"] > 0
    for key in ("churn", "mean_pairwise_kl", "bytes_exchanged", "config", "exchange"):
        assert key in s
    assert 0 <= s["ensemble"]["test_accuracy"] <= 1 and set(s["staleness"]) == {"mean", "max", "teacher_lead_max"}
    assert (s["bytes_exchanged"] == 0) == ("loss.alpha=0" in extra)
    assert s["config"]["loss"]["alpha"] == (0.0 if "loss.alpha=0" in extra else 0.5)
    assert (tmp_path / "peers" / "peer1-cnn.pt").exists() and (tmp_path / "job.yaml").exists()


@pytest.mark.slow
def test_default_quickstart_reaches_95_percent(tmp_path):
    """The README's first command: both peers >= 95% on digits (LocalEngine to keep CI time down)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "codistill.run",
            "--set",
            "engine=local",
            "--set",
            "tracking=none",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )  # not the checkout: the job must be found anyway
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert all(p["test_accuracy"] >= 0.95 for p in s["peers"]), s["peers"]
    assert s["ensemble"]["test_accuracy"] >= 0.95
