"""The cluster path for real: `ray start --head` (token auth), a second node joined with
`ray start --address`, `ray job submit -- python -m codistill.run`, then the run's files checked.
Only the processes this test started are stopped (matched by their private temp dir)."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Two nodes on one machine (and the test session's own Ray) must not share the per-node agent ports."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def stop_cluster(temp_dir: str) -> None:
    """Kill every process whose command line names our temp dir (`ray stop` would also stop the
    test session's own Ray)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline and int(entry) != os.getpid():
            pids.append(int(entry))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def generate_private_token(ray_bin: str, tmp_path: Path) -> Path:
    """A token made the way Ray 2.60 documents (`ray get-auth-token --generate`, which writes
    ~/.ray/auth_token), in a private home so the test touches nothing of the user's, readable by its
    owner only (Ray writes it with the default umask)."""
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(
        [ray_bin, "get-auth-token", "--generate"],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    token_path = home / ".ray" / "auth_token"
    assert r.returncode == 0 and token_path.exists(), r.stdout + r.stderr
    token_path.chmod(0o600)
    return token_path


def test_ray_job_submit_on_a_two_node_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="cdray", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dash_port = free_port(), free_port()
    beside = Path(sys.executable).parent / "ray"  # the ray CLI of this interpreter, else the one on PATH
    ray_bin = str(beside) if beside.exists() else shutil.which("ray") or "ray"
    token_path = generate_private_token(ray_bin, tmp_path)
    storage = tmp_path / "storage"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "CODISTILL_STORAGE": str(storage),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store under CODISTILL_STORAGE is what is tested
    env.pop("RAY_AUTH_TOKEN", None)
    run = lambda *args, **kw: subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, **kw)
    try:
        head = run(
            "start",
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=1",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            f"--dashboard-port={dash_port}",
            "--dashboard-host=127.0.0.1",
            "--object-store-memory=150000000",
            "--disable-usage-stats",
            *node_ports(),
            timeout=120,
        )
        assert head.returncode == 0, head.stdout + head.stderr
        worker = run(
            "start",
            f"--address=127.0.0.1:{gcs_port}",
            "--num-cpus=1",
            "--object-store-memory=150000000",
            "--disable-usage-stats",
            *node_ports(),
            timeout=120,
        )
        assert worker.returncode == 0, worker.stdout + worker.stderr
        deadline = time.time() + 60
        while True:  # the job API answers once the dashboard is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash_port}/api/version", timeout=2)
                break
            except urllib.error.HTTPError as e:  # 401 without a token: up, and authentication is on
                assert e.code == 401, e
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        # The README's command, as written, from the checkout: the job runs inside Ray's unpacked package
        # (deleted after the job); results must land in the storage root instead (CODISTILL_STORAGE,
        # given to the cluster's nodes when they started, as a cluster.yaml would).
        for _attempt in range(10):  # the job agent comes up a little after the dashboard
            submit = run(
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dash_port}",
                "--working-dir",
                ".",
                "--",
                "python",
                "-m",
                "codistill.run",
                "--config",
                "quickstart",
                "--set",
                "steps=60",
                "--set",
                "eval_every=30",
                "--set",
                "resources.num_cpus=1",
                "--set",
                "resources.placement=spread",
                timeout=300,
                cwd=ROOT,
            )
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-4000:]
        assert "succeeded" in output
        # the end of the run says where everything is; it is there after the job is gone
        run_dir = Path(re.search(r"run directory: (\S+)", output).group(1))  # type: ignore[union-attr]
        assert run_dir.is_relative_to(storage) and "_ray_pkg_" not in str(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert [p["steps"] for p in summary["peers"]] == [60, 60]
        assert len({p["node_id"] for p in summary["peers"]}) == 2  # one peer on each node
        uri = re.search(r"MLflow: store (\S+), run (\w+)", output)
        assert uri is not None and uri.group(1) == f"sqlite:///{storage / 'mlflow.db'}"
        assert f"mlflow ui --backend-store-uri {uri.group(1)}" in output
        import mlflow

        mlflow.set_tracking_uri(uri.group(1))
        runs = mlflow.search_runs(experiment_names=["quickstart"])
        assert len(runs) == 3 and (runs["status"] == "FINISHED").all(), (runs[["status"]], output[-4000:])
        assert uri.group(2) in set(runs["run_id"]) and summary["mlflow_run_id"] == uri.group(2)
        # artifacts (the summary, weights, logged models) too are in the storage root, after the job is gone
        assert all(a.startswith((storage / "mlartifacts").as_uri()) for a in runs["artifact_uri"])
        job_run = runs[runs["run_id"] == uri.group(2)].iloc[0]
        assert (Path(job_run["artifact_uri"].removeprefix("file://")) / "summary.json").exists()
        # a relative --output inside the job package is refused in one line
        refused = run(
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dash_port}",
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "codistill.run",
            "--output",
            "runs/here",
            "--set",
            "steps=5",
            timeout=300,
            cwd=ROOT,
        )
        assert refused.returncode != 0
        assert "error: --output: 'runs/here' is relative, and this driver runs inside Ray's job package" in (
            refused.stdout + refused.stderr
        )
    finally:
        stop_cluster(temp_dir)
