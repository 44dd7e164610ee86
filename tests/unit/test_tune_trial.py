"""A Tune trial's checkpoint becomes a run directory (no Ray: the files only)."""

import json

from codistill.sweeps.trial import _restore, trial_title


def make_checkpoint(tmp_path, made_by: str):
    ckpt = tmp_path / "ckpt"
    (ckpt / "checkpoints" / "peer0-mlp").mkdir(parents=True)
    (ckpt / "checkpoints" / "peer0-mlp" / "step-20.pt").write_bytes(b"weights")
    for name, content in {
        "progress.json": '{"rounds": []}',
        "job.yaml": "name: x\n",
        "run.json": '{"run_id": "x-1"}',
        "tracking.json": '{"run_id": "abc"}',
    }.items():
        (ckpt / name).write_text(content)
    (ckpt / "trial.json").write_text(json.dumps({"trial_id": made_by}))
    return ckpt


def test_its_own_checkpoint_resumes_the_same_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "leftover").write_text("from the interrupted attempt")
    _restore(str(make_checkpoint(tmp_path, "t1")), str(run), "t1")
    assert (run / "checkpoints" / "peer0-mlp" / "step-20.pt").read_bytes() == b"weights"
    assert (run / "tracking.json").exists() and (run / "run.json").exists() and not (run / "leftover").exists()


def test_another_trials_checkpoint_gets_this_trials_own_runs(tmp_path):
    run = tmp_path / "run"
    _restore(str(make_checkpoint(tmp_path, "t0")), str(run), "t1")  # PBT: t1 exploits t0
    assert (run / "progress.json").exists() and (run / "checkpoints" / "peer0-mlp" / "step-20.pt").exists()
    assert not (run / "tracking.json").exists() and not (run / "run.json").exists()


def test_trial_titles_say_what_they_try():
    assert trial_title({"loss.temperature": 2.5312, "loss.alpha": 0.4}) == "alpha=0.4,temperature=2.531"
