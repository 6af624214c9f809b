"""Run a scenario: build the net, start workers and the server in their hosts, collect.

For each group of sweep points that share a network (same topology, links and models):
build the net (testbed.linkemu) -> quick calibration (refuse links out of tolerance unless
forced) -> start one `python -m specfed.worker` per worker host (logs to files, readiness
from the ready line, bounded by timeouts.worker_ready_s) -> start `python -m specfed.server`
in host srv with the group's points (it appends rows to the run's tables as it goes) ->
stop the processes by PID -> tear the net down. A failing group is recorded in meta.json
and the run goes on with the next; the rows of every finished round are kept.

Results: results/<scenario>/<utc>-<git-sha>/ with scenario.yaml (resolved), meta.json,
points.csv, rounds.csv, requests.csv, events.jsonl and logs/.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from testbed.scenario import Point, Scenario, expand, link_options
from topologies import load_topology

REPO = Path(__file__).resolve().parents[1]
WORKER_PORT = 7100


class RunError(RuntimeError):
    """A run could not go on; the message says which group / host / process and why."""


def git_state() -> dict[str, Any]:
    """The repository's commit and whether the work tree differs from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    sha = git("rev-parse", "HEAD")
    return {
        "sha": sha or "unknown",
        "short": sha[:8] or "nogit",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "numpy", "pandas", "specfed-testbed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def new_run_dir(scenario: Scenario, out_root: Path) -> Path:
    """results/<scenario>/<utc>-<git-sha>/ (with a suffix if two runs start in one second)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = out_root / scenario.name / f"{stamp}-{git_state()['short']}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    (run_dir / "logs").mkdir(parents=True)
    return run_dir


@dataclass
class Meta:
    """meta.json, rewritten after every group so a crash keeps what was learned."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        tmp.replace(self.path)


def _link_tags(emu: Any, workers: list[str]) -> dict[str, Any]:
    """Constant columns for the tables: the access-link parameters (effective, queues
    included) of every worker and of the server, and the link backend. `up` is host ->
    switch."""
    tags: dict[str, Any] = {"link_backend": emu.backend}
    hosts = [*workers, "srv"]
    for (a, b), spec in emu.links.items():
        host = a if a in hosts else b if b in hosts else None
        if host is None:
            continue
        up, down = (spec.up, spec.down) if host == a else (spec.down, spec.up)
        for d, p in (("up", up), ("down", down)):
            tags[f"{host}_{d}_bw_mbit"] = p.bw_mbit if p.bw_mbit is not None else ""
            tags[f"{host}_{d}_delay_ms"] = p.delay_ms
            tags[f"{host}_{d}_loss_pct"] = p.loss_pct
            tags[f"{host}_{d}_queue_pkts"] = p.max_queue_size
    return tags


class Processes:
    """Processes this run started inside Mininet hosts; ended by PID, never by name."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, host: Any, argv: list[str], log: Path, role: str) -> subprocess.Popen[bytes]:
        fh = log.open("ab")
        try:
            proc = host.popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=str(REPO),
                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            )
        finally:
            fh.close()  # the child holds its own descriptor; never an unread pipe
        self.procs.append((role, proc))
        with contextlib.suppress(ProcessLookupError):  # already gone: its log says why
            self.state.record_process(proc.pid, role)
        return proc

    def stop_all(self, timeout_s: float = 10.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout_s: float, what: str) -> None:
    """Wait for the worker's ready line in its log (it loads its model first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "specfed.worker ready on" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise RunError(
                f"{what} exited with status {proc.returncode} before it was "
                f"ready; last lines of {log}:\n{tail}"
            )
        time.sleep(0.2)
    raise RunError(f"{what} not ready after {timeout_s:.0f} s (timeouts.worker_ready_s); see {log}")


def _count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open(encoding="utf-8") as fh:
        return max(0, sum(1 for _ in fh) - 1)


def _server_argv(
    sc: Scenario,
    group: list[Point],
    points_file: Path,
    run_dir: Path,
    run_id: str,
    addrs: str,
    tags: dict[str, Any],
) -> list[str]:
    m, d, to = sc["models"], sc["decoding"], sc["timeouts"]
    workers = list(sc.workers)
    argv = [
        sys.executable,
        "-m",
        "specfed.server",
        "--draft",
        m["draft"],
        "--workers",
        addrs,
        "--worker-names",
        ",".join(workers),
        "--points-file",
        str(points_file),
        "--prompts",
        d["prompts"],
        "--max-new-tokens",
        str(d["max_new_tokens"]),
        "--seed",
        str(sc["seed"]),
        "--dtype",
        m["dtype"],
        "--threads",
        str(m["threads"]),
        "--out",
        str(run_dir),
        "--run-id",
        run_id,
        "--on-worker-loss",
        sc["on_worker_loss"],
        "--connect-timeout",
        str(to["connect_s"]),
        "--read-timeout",
        str(to["read_s"]),
        "--round-timeout",
        str(to["round_s"]),
        "--quiet",
    ]
    if m.get("weights"):
        argv += ["--weights", ",".join(str(m["weights"][w]) for w in workers)]
    for k, v in tags.items():
        argv += ["--tag", f"{k}={v}"]
    return argv


def _points_json(group: list[Point]) -> list[dict[str, Any]]:
    out = []
    for p in group:
        tr, dec = p.scenario["transmission"], p.scenario["decoding"]
        out.append(
            {
                "transmission": tr["mode"],
                "k": tr["k"],
                "reconstruction": tr["reconstruction"] if tr["mode"] != "full" else "none",
                "gamma": dec["gamma"],
                "temperature": dec["temperature"],
                "epsilon": tr["epsilon"],
                "value_dtype": tr["value_dtype"],
                "point": p.index,
                "rep": p.rep,
            }
        )
    return out


def run_group(
    group: list[Point],
    run_dir: Path,
    run_id: str,
    meta: Meta,
    *,
    force: bool,
    on_progress: Callable[[int], None],
) -> None:
    """Build the net for one group of points, run them, tear down (always)."""
    from testbed.calibrate import Tolerance, calibrate_pair
    from testbed.linkemu import TcpSettings, build_net

    sc = group[0].scenario
    t = sc["topology"]
    topo = load_topology(t["name"], t.get("file"))(**t.get("params", {}))
    default, per = link_options(sc, topo.hosts(), topo.links())
    net_cfg = sc["network"]
    gi = len(meta.data["groups"])
    info: dict[str, Any] = {
        "points": [p.index for p in group],
        "rep": group[0].rep,
        "values": group[0].values,
        "status": "running",
    }
    meta.data["groups"].append(info)
    t0 = time.monotonic()
    emu = build_net(
        topo,
        per,
        default=default,
        backend=None if net_cfg["backend"] == "auto" else net_cfg["backend"],
        tcp=TcpSettings(net_cfg["tcp_congestion"], net_cfg["tcp_slow_start_after_idle"]),
        label=f"run-{run_id}-g{gi}",
        seed=sc["seed"],
    )
    procs = Processes(emu.state)
    try:
        info.update(
            setup_s=time.monotonic() - t0,
            link_backend=emu.backend,
            tcp=emu.tcp,
            links=emu.link_metadata(),
        )
        meta.data.setdefault("link_backend", emu.backend)
        workers = list(sc.workers)
        if net_cfg["calibrate"]:
            tol = Tolerance(
                net_cfg["rtt_tolerance_ms"],
                net_cfg["rtt_tolerance_pct"] / 100,
                net_cfg["goodput_min_ratio"],
            )
            cal = [
                calibrate_pair(emu, w, "srv", tolerance=tol, pings=20, duration_s=1.0)
                for w in workers
            ]
            info["calibration"] = [c.as_dict() for c in cal]
            meta.save()
            bad = [c for c in cal if not c.passed]
            if bad and not force:
                raise RunError(
                    "link calibration out of tolerance (use --force to run anyway): "
                    + "; ".join(
                        f"{c.a}-{c.b}: RTT {c.rtt.mean_ms:.2f} ms for "
                        f"{c.configured_rtt_ms:.2f} configured, goodput "
                        + ", ".join(f"{g.ratio:.2f}" for g in c.goodput if g.ratio is not None)
                        for c in bad
                    )
                )
        m = sc["models"]
        addrs = []
        started = []
        for w in workers:
            host = emu.net[w]
            log = run_dir / "logs" / f"worker-{w}-g{gi}.log"
            argv = [
                sys.executable,
                "-m",
                "specfed.worker",
                "--model",
                sc.workers[w],
                "--listen",
                f"{host.IP()}:{WORKER_PORT}",
                "--threads",
                str(m["threads"]),
                "--dtype",
                m["dtype"],
                "--idle-timeout",
                str(sc["timeouts"]["point_s"]),
            ]
            started.append((procs.start(host, argv, log, f"worker {w}"), log, w))
            addrs.append(f"{host.IP()}:{WORKER_PORT}")
        for proc, log, w in started:
            _wait_ready(proc, log, sc["timeouts"]["worker_ready_s"], f"worker {w}")
        points_file = run_dir / f"points-g{gi}.json"
        points_file.write_text(json.dumps(_points_json(group), indent=1))
        tags = _link_tags(emu, workers)
        server_log = run_dir / "logs" / f"server-g{gi}.log"
        server = procs.start(
            emu.net["srv"],
            _server_argv(sc, group, points_file, run_dir, run_id, ",".join(addrs), tags),
            server_log,
            "server",
        )
        deadline = time.monotonic() + sc["timeouts"]["point_s"] * len(group)
        requests_csv = run_dir / "requests.csv"
        base = _count_rows(requests_csv)
        while server.poll() is None:
            if time.monotonic() > deadline:
                raise RunError(f"group {gi} exceeded timeouts.point_s x {len(group)} points")
            on_progress(_count_rows(requests_csv) - base)
            time.sleep(0.5)
        on_progress(_count_rows(requests_csv) - base)
        if server.returncode != 0:
            tail = server_log.read_text(errors="replace")[-2000:]
            raise RunError(
                f"server exited with status {server.returncode} in group {gi}; "
                f"last lines of {server_log}:\n{tail}"
            )
        info["status"] = "ok"
    except BaseException as exc:
        info["status"] = "failed"
        info["error"] = str(exc)
        raise
    finally:
        procs.stop_all()
        info["teardown"] = emu.teardown().__dict__ if hasattr(emu, "teardown") else None
        info["wall_s"] = time.monotonic() - t0
        meta.save()


def run_scenario(
    scenario: Scenario,
    out_root: Path = Path("results"),
    repetitions: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> tuple[Path, bool]:
    """Run every point x repetition; return (run folder, all groups succeeded)."""
    from tqdm import tqdm

    if os.geteuid() != 0:
        raise RunError(
            "`testbed run` needs root (Mininet creates namespaces and links); "
            "run it with sudo or as root"
        )
    points = expand(scenario, repetitions)
    run_dir = new_run_dir(scenario, out_root)
    run_id = run_dir.name
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump(scenario.data, sort_keys=False))
    with (run_dir / "points.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["point", "rep", "values"])
        for p in points:
            w.writerow([p.index, p.rep, json.dumps(p.values)])
    meta = Meta(
        run_dir / "meta.json",
        {
            "scenario": scenario.name,
            "source": str(scenario.path),
            "run_id": run_id,
            "started_utc": datetime.now(UTC).isoformat(),
            "git": git_state(),
            "kernel": platform.release(),
            "host": platform.node(),
            "versions": versions(),
            "command": sys.argv,
            "groups": [],
        },
    )
    meta.save()
    groups: list[list[Point]] = []
    for p in points:
        if groups and groups[-1][0].infra_key == p.infra_key and groups[-1][0].rep == p.rep:
            groups[-1].append(p)
        else:
            groups.append([p])
    n_prompts = _prompt_count(scenario)
    total = len(points) * n_prompts
    ok = True
    bar = tqdm(total=total, desc=scenario.name, unit="request", disable=not progress)
    done_before = 0
    try:
        for gi, group in enumerate(groups):
            bar.set_postfix_str(f"network {gi + 1}/{len(groups)}, {len(group)} points")

            def on_progress(n: int, base: int = done_before) -> None:
                bar.n = min(total, base + n)
                bar.refresh()

            try:
                run_group(group, run_dir, run_id, meta, force=force, on_progress=on_progress)
            except RunError as exc:
                ok = False
                print(
                    f"\ntestbed: group {gi + 1} ({group[0].label}) failed: {exc}", file=sys.stderr
                )
            done_before += len(group) * n_prompts
    finally:
        bar.close()
        meta.data["finished_utc"] = datetime.now(UTC).isoformat()
        meta.data["ok"] = ok
        meta.save()
    return run_dir, ok


def _prompt_count(scenario: Scenario) -> int:
    from specfed.prompts import load_prompts

    return len(load_prompts(scenario["decoding"]["prompts"]))
