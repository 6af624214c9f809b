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
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from specfed.points import write_points
from specfed.policies import GOODPUT_PER_RATE, LinkEstimate
from specfed.provenance import REPO, git_state, versions
from testbed.scenario import REQUEST_PATHS, Scenario, ScenarioPoint, expand, group_points

WORKER_PORT = 7100


class RunError(RuntimeError):
    """A run could not go on; the message says which group / host / process and why."""


def new_run_dir(scenario: Scenario, out_root: Path) -> Path:
    """results/<scenario>/<utc>-<git-sha>/ (with a suffix if two runs start in one second).

    The scenario name is one safe path component (the schema checks it); the folder is
    checked again to lie inside `out_root` before anything is created.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = out_root.resolve()
    base = root / scenario.name / f"{stamp}-{git_state()['short']}"
    if root not in base.resolve().parents:
        raise RunError(f"run folder {base} would lie outside the results root {root}")
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


def _link_tags(emu: Any, workers: Sequence[str]) -> dict[str, Any]:
    """Constant columns for the tables: the parameters (effective, queues included) of every
    link, and the link backend. A host's access link is named by the host (`w1_up_bw_mbit`,
    up = host -> switch), any other link by its nodes (`e1-s0_up_bw_mbit`, up = e1 -> s0).
    `w1_up_trace` names the trace a direction's rate follows ("" for none; its `bw_mbit`
    is then ""): the rate at a moment comes from meta.json's `trace_start_mono_s` of the
    link and testbed.linkparams.rate_at."""
    tags: dict[str, Any] = {"link_backend": emu.backend}
    hosts = {*workers, "srv"}
    for (a, b), spec in emu.links.items():
        if a in hosts or b in hosts:
            name = a if a in hosts else b
            up, down = (spec.up, spec.down) if name == a else (spec.down, spec.up)
        else:
            name, up, down = f"{a}-{b}", spec.up, spec.down
        for d, p in (("up", up), ("down", down)):
            tags[f"{name}_{d}_bw_mbit"] = p.bw_mbit if p.bw_mbit is not None else ""
            tags[f"{name}_{d}_delay_ms"] = p.delay_ms
            tags[f"{name}_{d}_jitter_ms"] = p.jitter_ms
            tags[f"{name}_{d}_loss_pct"] = p.loss_pct
            tags[f"{name}_{d}_queue_pkts"] = p.max_queue_size
            tags[f"{name}_{d}_trace"] = p.trace.name if p.trace is not None else ""
    return tags


def calibrated_estimates(calibration: Sequence[dict[str, Any]]) -> dict[str, LinkEstimate]:
    """Worker host -> its path to the server as calibrated (`LinkCalibration.as_dict()` of
    calibrate_pair(worker, "srv")): the measured median RTT (mean in older records) and the
    worker -> server upload goodput: TCP goodput where it was measured, else the measured
    link rate (UDP train, Ethernet frames) times the TCP payload share of a frame; what
    link-aware K starts from in a live run. No measurement in that direction: unlimited."""
    out = {}
    for cal in calibration:
        tcp = next((g for g in cal.get("goodput", []) if g["src"] == cal["a"]), None)
        udp = next((r for r in cal.get("rate", []) if r["src"] == cal["a"]), None)
        if tcp and tcp["mbit"] > 0:
            up: float | None = float(tcp["mbit"])
        elif udp and udp["mbit"] > 0:
            up = float(udp["mbit"]) * GOODPUT_PER_RATE
        else:
            up = None
        rtt = cal["rtt"].get("median_ms", math.nan)
        rtt = rtt if math.isfinite(rtt) else cal["rtt"]["mean_ms"]
        out[cal["a"]] = LinkEstimate(up_mbit=up, rtt_ms=max(0.0, float(rtt)), source="calibrated")
    return out


#: The compute columns of a role: `<role>_profile`, `<role>_speed`.
COMPUTE_TAGS = ("profile", "speed")


def _compute_tags(compute: dict[str, Any], roles: Sequence[str]) -> dict[str, Any]:
    """Constant columns naming each role's compute: `draft_profile`, `draft_speed`,
    `w1_profile`, ... ("live" everywhere for a live group)."""
    out: dict[str, Any] = {}
    for role in roles:
        rc = compute.get(role)
        out[f"{role}_profile"] = rc.profile if rc is not None else "live"
        out[f"{role}_speed"] = rc.speed if rc is not None else 1.0
    return out


def tag_columns(points: Sequence[ScenarioPoint], swept: Sequence[str]) -> list[str]:
    """Every constant column any network group of a run writes: the parameters of every
    link of any group's topology, the swept paths, each role's compute. Each group writes
    all of them (empty where its network has no such link or role), so a run whose groups
    differ in topology (N = 2 then N = 32) keeps one header per table."""
    from types import SimpleNamespace

    from testbed.scenario.paths import configured_specs

    cols: dict[str, None] = {}
    for group in group_points(points):
        p = group[0]
        workers = list(p.scenario.spec.models.workers)
        planned = SimpleNamespace(links=configured_specs(p.scenario), backend="")
        cols.update(dict.fromkeys(_link_tags(planned, workers)))
        cols.update(dict.fromkeys(_swept_tags(p, swept)))
        cols.update(dict.fromkeys(f"{r}_{x}" for r in ("draft", *workers) for x in COMPUTE_TAGS))
    return list(cols)


def _swept_tags(point: ScenarioPoint, swept: Sequence[str]) -> dict[str, Any]:
    """Constant columns for the swept paths that are not per-request options (those are
    columns already): `decoding.max_new_tokens`, `models.dtype`, `links.e1-s0.bw_mbit`..."""
    out = {}
    for path in swept:
        if path in REQUEST_PATHS:
            continue
        try:
            value = point.scenario.get(path)
        except KeyError:
            value = ""
        out[path] = "" if value is None else value
    return out


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


#: Live groups: the server's unrecorded warm-up request, in tokens (specfed.server
#: --warmup-tokens), so every prompt of every point is measured with warm processes.
WARMUP_TOKENS = 8


def _server_argv(
    point: ScenarioPoint,
    points_file: Path,
    run_dir: Path,
    run_id: str,
    group_index: int,
    addrs: str,
    tags: dict[str, Any],
) -> list[str]:
    s = point.scenario.spec
    m, d, to = s.models, s.decoding, s.timeouts
    workers = list(m.workers)
    argv = [
        sys.executable, "-m", "specfed.server",
        "--draft", m.draft,
        "--workers", addrs,
        "--worker-names", ",".join(workers),
        "--points-file", str(points_file),
        "--prompts", d.prompts,
        "--max-new-tokens", str(d.max_new_tokens),
        "--seed", str(s.seed),
        "--dtype", m.dtype,
        "--threads", str(m.threads),
        "--out", str(run_dir),
        "--info-file", f"server-g{group_index}.json",
        "--run-id", run_id,
        "--on-worker-loss", s.on_worker_loss.value,
        "--connect-timeout", repr(to.connect_s),
        "--read-timeout", repr(to.read_s),
        "--round-timeout", repr(to.round_s),
        "--warmup-tokens", str(WARMUP_TOKENS),
        "--quiet",
    ]  # fmt: skip
    if m.weights:
        argv += ["--weights", ",".join(repr(m.weights[w]) for w in workers)]
    for k, v in tags.items():
        argv += ["--tag", f"{k}={v}"]
    return argv


def run_group(
    group: list[ScenarioPoint],
    run_dir: Path,
    run_id: str,
    meta: Meta,
    *,
    force: bool,
    swept: Sequence[str],
    on_progress: Callable[[int], None],
    columns: Sequence[str] = (),
) -> None:
    """Build the net for one group of points, run them, tear down (always)."""
    from testbed.calibrate import calibrate_pair
    from testbed.netbuild import scenario_net, tolerance

    sc = group[0].scenario
    spec = sc.spec
    gi = len(meta.data["groups"])
    info: dict[str, Any] = {
        "points": [p.index for p in group],
        "rep": group[0].rep,
        "values": group[0].values,
        "status": "running",
    }
    meta.data["groups"].append(info)
    t0 = time.monotonic()
    replay = spec.compute.mode == "replay"
    traces: list[Path] = []
    compute: dict[str, Any] = {}
    if replay:  # record what is missing first, outside the network (cached across runs)
        from testbed.compute import ComputeError, ensure_traces, roles

        try:
            compute = roles(sc)
            traces = ensure_traces(group, run_dir, run_dir / "logs" / f"record-g{gi}.log")
        except (ComputeError, ValueError) as exc:
            info.update(status="failed", error=str(exc))
            meta.save()
            raise RunError(str(exc)) from exc
        info["compute"] = {
            "mode": "replay",
            "traces": [str(t) for t in traces],
            "roles": {r: {"profile": c.profile, "speed": c.speed, "source": c.source,
                          "document": c.document} for r, c in compute.items()},
            "record_s": time.monotonic() - t0,
        }  # fmt: skip
        meta.save()
    emu = scenario_net(group[0], label=f"run-{run_id}-g{gi}")
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
        if spec.network.calibrate:
            tol = tolerance(spec.network)
            cal = [calibrate_pair(emu, w, "srv", tolerance=tol, pings=20) for w in workers]
            info["calibration"] = [c.as_dict() for c in cal]
            meta.save()
            bad = [c for c in cal if not c.passed]
            if bad and not force:
                raise RunError(
                    "link calibration out of tolerance after retries (use --force to run "
                    "anyway): " + "; ".join(f"{c.a}-{c.b}: {p}" for c in bad for p in c.problems)
                )
        m = spec.models
        addrs = []
        started = []
        for w in workers:
            host = emu.net[w]
            log = run_dir / "logs" / f"worker-{w}-g{gi}.log"
            argv = [
                sys.executable, "-m", "specfed.worker",
                "--model", m.workers[w],
                "--listen", f"{host.IP()}:{WORKER_PORT}",
                "--threads", str(m.threads),
                "--dtype", m.dtype,
                "--idle-timeout", repr(spec.timeouts.point_s),
            ]  # fmt: skip
            if replay:
                from testbed.compute import replay_args

                argv += replay_args(traces, compute[w])
            started.append((procs.start(host, argv, log, f"worker {w}"), log, w))
            addrs.append(f"{host.IP()}:{WORKER_PORT}")
        for proc, log, w in started:
            _wait_ready(proc, log, spec.timeouts.worker_ready_s, f"worker {w}")
        points_file = run_dir / f"points-g{gi}.json"
        requests = [p.request for p in group]
        if not replay and "calibration" in info:  # k: auto starts from the measured links
            estimates = calibrated_estimates(info["calibration"])
            requests = [r.with_links(estimates) for r in requests]
        write_points(points_file, requests)
        tags = {
            **dict.fromkeys(columns or (), ""),  # one header for every group of the run
            **_link_tags(emu, workers),
            **_swept_tags(group[0], swept),
            **_compute_tags(compute, ["draft", *workers]),
        }
        server_log = run_dir / "logs" / f"server-g{gi}.log"
        server_argv = _server_argv(
            group[0], points_file, run_dir, run_id, gi, ",".join(addrs), tags
        )
        if replay:
            from testbed.compute import replay_args

            server_argv += replay_args(traces, compute["draft"])
        server = procs.start(emu.net["srv"], server_argv, server_log, "server")
        deadline = time.monotonic() + spec.timeouts.point_s * len(group)
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
    _need_root()
    reps = repetitions if repetitions is not None else scenario.spec.repetitions
    points = expand(scenario, reps)
    run_dir = new_run_dir(scenario, out_root)
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
            "run_id": run_dir.name,
            "started_utc": datetime.now(UTC).isoformat(),
            "git": git_state(),
            "kernel": platform.release(),
            "host": platform.node(),
            "versions": versions(),
            "command": sys.argv,
            "repetitions": reps,
            "groups": [],
        },
    )
    meta.save()
    return _execute(scenario, points, points, run_dir, meta, force, progress)


def finished_points(run_dir: Path, n_prompts: int) -> set[tuple[int, int]]:
    """(point, rep) pairs whose every prompt has an "ok" row in the run's requests table."""
    path = run_dir / "requests.csv"
    if not path.exists() or not path.stat().st_size:
        return set()
    counts: dict[tuple[int, int], int] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("status") == "ok":
                key = (int(row["point"]), int(row["rep"]))
                counts[key] = counts.get(key, 0) + 1
    return {k for k, n in counts.items() if n >= n_prompts}


def resume_run(run_dir: Path, force: bool = False, progress: bool = True) -> tuple[Path, bool]:
    """Continue an interrupted run in its own folder: the points (and repetitions) whose
    requests did not all finish run again, the others are kept; rows are appended to the
    same tables under the same run id, and meta.json records the resumption."""
    from testbed.scenario import load_scenario

    _need_root()
    meta_path = run_dir / "meta.json"
    if not meta_path.is_file() or not (run_dir / "scenario.yaml").is_file():
        raise RunError(f"{run_dir} is not a run folder (no meta.json / scenario.yaml)")
    meta = Meta(meta_path, json.loads(meta_path.read_text()))
    scenario = load_scenario(run_dir / "scenario.yaml")
    reps = int(meta.data.get("repetitions", scenario.spec.repetitions))
    points = expand(scenario, reps)
    done = finished_points(run_dir, _prompt_count(scenario))
    todo = [p for p in points if (p.index, p.rep) not in done]
    meta.data.setdefault("resumed", []).append(
        {
            "utc": datetime.now(UTC).isoformat(),
            "git": git_state(),
            "command": sys.argv,
            "points_done_before": len(points) - len(todo),
        }
    )
    meta.data.pop("stopped", None)
    meta.save()
    return _execute(scenario, points, todo, run_dir, meta, force, progress)


def run_status(meta_path: Path) -> dict[str, Any]:
    """One line of `testbed list`: scenario, run, commit, status and requests done."""
    run_dir = meta_path.parent
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return {"scenario": run_dir.parent.name, "run": run_dir.name, "commit": "?",
                "status": "unreadable meta.json", "requests ok": "?", "started": "?"}  # fmt: skip
    git = meta.get("git", {})
    if "finished_utc" not in meta:
        status = "running or killed"
    elif meta.get("stopped"):
        status = meta["stopped"]
    else:
        status = "ok" if meta.get("ok") else "failed"
    ok_rows = 0
    req = run_dir / "requests.csv"
    if req.exists():
        with req.open(encoding="utf-8", newline="") as fh:
            ok_rows = sum(1 for row in csv.DictReader(fh) if row.get("status") == "ok")
    return {
        "scenario": meta.get("scenario", run_dir.parent.name),
        "run": run_dir.name,
        "commit": f"{git.get('short', '?')}{'+dirty' if git.get('dirty') else ''}",
        "status": status,
        "requests ok": ok_rows,
        "started": str(meta.get("started_utc", "?"))[:19],
    }


def _need_root() -> None:
    if os.geteuid() != 0:
        raise RunError(
            "`testbed run` needs root (Mininet creates namespaces and links); "
            "run it with sudo or as root"
        )


def _execute(
    scenario: Scenario,
    points: list[ScenarioPoint],
    todo: list[ScenarioPoint],
    run_dir: Path,
    meta: Meta,
    force: bool,
    progress: bool,
) -> tuple[Path, bool]:
    """Run the groups of `todo` (all of a run's `points` fix the columns), with a progress
    bar, signal handling and the final meta.json."""
    from tqdm import tqdm

    run_id = run_dir.name
    points, all_points = todo, points
    groups = group_points(points)
    swept = list(dict.fromkeys(path for p in all_points for path in p.values))
    columns = tag_columns(all_points, swept)
    n_prompts = _prompt_count(scenario)
    total = len(points) * n_prompts
    ok = True
    bar = tqdm(total=total, desc=scenario.name, unit="request", disable=not progress)
    done_before = 0
    try:
        with _stop_on_signals():
            for gi, group in enumerate(groups):
                bar.set_postfix_str(f"network {gi + 1}/{len(groups)}, {len(group)} points")

                def on_progress(n: int, base: int = done_before) -> None:
                    bar.n = min(total, base + n)
                    bar.refresh()

                try:
                    run_group(
                        group,
                        run_dir,
                        run_id,
                        meta,
                        force=force,
                        swept=swept,
                        on_progress=on_progress,
                        columns=columns,
                    )
                except RunError as exc:
                    ok = False
                    print(
                        f"\ntestbed: group {gi + 1} ({group[0].label}) failed: {exc}",
                        file=sys.stderr,
                    )
                done_before += len(group) * n_prompts
    except Stopped as exc:
        ok = False
        meta.data["stopped"] = str(exc)
        raise
    finally:
        bar.close()
        meta.data["finished_utc"] = datetime.now(UTC).isoformat()
        meta.data["ok"] = ok
        meta.save()
    return run_dir, ok


class Stopped(BaseException):
    """The run was stopped by a signal (SIGTERM, SIGHUP, SIGINT): everything it started is
    torn down on the way out, the rows written so far stay."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP / SIGINT into `Stopped`, so every `finally` (processes, links,
    state files) runs as for Ctrl-C; the previous handlers come back afterwards."""

    def handler(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    sigs = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _prompt_count(scenario: Scenario) -> int:
    from specfed.prompts import load_prompts

    return len(load_prompts(scenario.spec.decoding.prompts))
