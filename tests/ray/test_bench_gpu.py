"""bench/gpu.py, the one command for every GPU figure, runs its whole path on a CPU (`--device cpu --quick`):
CI has no GPU, so this is what proves the script a GPU machine runs once starts, trains every part and writes
its JSON. The figures themselves mean nothing at these sizes."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_bench_gpu_quick_runs_every_part_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    loop = result["loop"]
    variants = ["plain loop", "LocalEngine", "Ray logits", "Ray checkpoint p10", "Ray alpha=0"]
    assert [row["variant"] for row in loop if row["model"] == "resnet20"] == variants
    assert [row["variant"] for row in loop if row["model"] == "gpt-small"] == variants[:3]  # the same Ray path
    assert all(row["samples_per_s"] > 0 for row in loop + result["sharing"])
    assert [row["num_peers"] for row in result["sharing"]] == [2, 2]
    arms = result["cifar"]["arms"]
    assert [a["arm"] for a in arms] == ["DML", "checkpoint"] and all(len(a["peer_accuracy"]) == 2 for a in arms)
    phases = result["breakdown"]["median_ms"]
    assert set(phases) == {"forward", "d2h copy", "publish", "pull", "loss+backward+step"}
    assert all(v > 0 for v in phases.values())
    scaling = result["scaling"]  # (e): Anil et al.'s batch-size claim, its own JSON beside
    assert len(scaling["by_target"]) == 3 and (tmp_path / scaling["json"]).is_file()
    assert set(result["elapsed_s"]) == {"loop", "sharing", "cifar", "breakdown", "scaling", "total"}
