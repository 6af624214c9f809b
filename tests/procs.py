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
