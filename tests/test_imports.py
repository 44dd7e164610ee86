"""Each public module imports in a fresh process (no cycles), and the core stays free of ray and mlflow."""

import subprocess
import sys

import pytest

CORE = ["codistill.config", "codistill.losses", "codistill.models", "codistill.data", "codistill.metrics",
        "codistill.peer"]
ALL = CORE + ["codistill.exchange", "codistill.engine", "codistill.run"]


@pytest.mark.parametrize("module", ALL)
def test_module_imports_alone(module):
    code = ("import sys, importlib; importlib.import_module(%r); "
            "print(','.join(m for m in ('ray', 'mlflow') if m in sys.modules))") % module
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if module in CORE:
        assert r.stdout.strip() == "", f"{module} pulled in {r.stdout.strip()}"
