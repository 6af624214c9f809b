"""Worker subprocesses for the loopback tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class WorkerProc:
    """A `python -m specfed.worker` subprocess on 127.0.0.1 with an OS-chosen port."""

    def __init__(self, model_dir: Path | str, log: Path, *extra: str) -> None:
        self.log = log
        self.fh = log.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "specfed.worker",
                "--model",
                str(model_dir),
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--dtype",
                "fp32",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self.fh,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the ready line (bounded by the test timeout)
        if "ready on" not in line:
            self.stop()
            raise RuntimeError(f"worker did not start: {line!r}\n{log.read_text()}")
        self.port = int(line.split("ready on ")[1].split()[0].rsplit(":", 1)[1])
        self.addr = ("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.fh.close()


def run_server(
    workers: list[WorkerProc],
    out: Path,
    *,
    draft: str,
    points_file: Path,
    prompts: str,
    max_new_tokens: int,
    seed: int,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """`python -m specfed.server` against `workers` (weights 1/2 each, fp32, one thread),
    records into `out`; returns the finished process."""
    return subprocess.run(
        [
            sys.executable, "-m", "specfed.server",
            "--draft", draft,
            "--workers", ",".join(f"127.0.0.1:{w.port}" for w in workers),
            "--weights", ",".join(["0.5"] * len(workers)),
            "--points-file", str(points_file),
            "--prompts", prompts,
            "--max-new-tokens", str(max_new_tokens),
            "--seed", str(seed),
            "--dtype", "fp32", "--threads", "1",
            "--out", str(out), "--quiet",
            *extra,
        ],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a records CSV as dicts of strings."""
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))
