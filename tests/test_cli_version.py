"""Every command a user runs answers --version (the project's version and git state) and
exits 0."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    "testbed.cli", "analysis.cli", "specfed.worker", "specfed.server", "specfed.trace",
    "specfed.bundle", "specfed.record", "specfed.bench", "specfed.demo", "specfed.study",
    "testbed.policybench", "testbed.linkbench", "testbed.scenario.reference",
    "testbed.emubench", "analysis.paper",
]  # fmt: skip


@pytest.mark.parametrize("module", COMMANDS)
def test_version(module: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "specfed-testbed" in res.stdout and "git " in res.stdout
