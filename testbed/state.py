"""State files: what a run created, so that exactly that (and nothing else) can be removed.

Every process, bridge, interface and network namespace that the testbed creates is
written to a state file *before* or *as* it is created. A normal run removes its file after
``net.stop()``; a crashed run (even SIGKILLed) leaves it behind, and
:func:`cleanup_recorded` then removes what it lists:

- a process only if ``/proc/PID/stat`` still shows the start time recorded with it
  (a recycled PID is left alone);
- an interface or bridge only if one with that name exists in the same network namespace
  and its ifindex is the recorded one (or, for a record written just before creation,
  higher than every ifindex that existed then: devices get increasing indexes);
- a Mininet host's (anonymous) namespace by ending the recorded shell that owns it and the
  processes still inside it (found through the live, verified owner, never by name).

Nothing is ever found or killed by name. The state directory is ``$SPECFED_STATE_DIR``,
default ``<repo>/.state/`` (git-ignored). Files are JSON lines, one record per line,
appended with single ``write`` calls, so a crash loses at most the record being written.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "SPECFED_STATE_DIR"
STATE_SUFFIX = ".jsonl"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_counter = itertools.count(1)


def state_dir() -> Path:
    """The project state directory: ``$SPECFED_STATE_DIR`` or ``<repo>/.state``."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else _REPO_ROOT / ".state"


# --------------------------------------------------------------------------- /proc helpers


def proc_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (/proc/PID/stat field 22),
    or None if there is no such process. Together with the PID it names a process
    uniquely for the life of the machine."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and ')': split after the last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # zombie: already dead, only waiting to be reaped
        return None
    return int(fields[19])


def proc_matches(pid: int, start: int) -> bool:
    """True if ``pid`` is alive and is the process that was recorded with ``start``."""
    return pid > 0 and proc_start_time(pid) == start


def netns_inode(pid: int | str = "self") -> int | None:
    """Inode of the network namespace of ``pid`` (identifies the namespace while it lives)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def pids_in_netns(inode: int) -> list[int]:
    """PIDs of every process whose network namespace has inode ``inode``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and netns_inode(entry) == inode:
            out.append(int(entry))
    return out


def link_ifindex(name: str) -> int | None:
    """ifindex of interface ``name`` in this process's namespace, or None if absent."""
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None


def max_ifindex() -> int:
    """Highest ifindex in this namespace now (devices created later get higher ones)."""
    best = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/sys/class/net"):
            best = max(best, link_ifindex(name) or 0)
    return best


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ProcRecord:
    """A process: ``pid``, ``start`` (clock ticks since boot), what it is (``role``)."""

    pid: int
    start: int
    role: str = ""


@dataclass
class LinkRecord:
    """A network device (interface or bridge).

    ``netns_pid``/``netns_start`` name the process whose namespace holds it (None = the
    state file's own namespace, normally the root one). ``ifindex`` is set once it exists;
    before that ``after_ifindex`` holds the highest ifindex that existed when it was
    recorded. ``kind`` is ``"link"`` or ``"bridge"``.
    """

    name: str
    kind: str = "link"
    ifindex: int | None = None
    after_ifindex: int = 0
    netns_pid: int | None = None
    netns_start: int | None = None
    role: str = ""


@dataclass(frozen=True)
class NetnsRecord:
    """An anonymous network namespace (a Mininet host's), owned by process ``pid``."""

    pid: int
    start: int
    inode: int
    role: str = ""


@dataclass
class StateRecords:
    """Everything one state file lists (later records of the same device win)."""

    path: Path
    owner: ProcRecord | None = None
    netns: int | None = None  # inode of the namespace the owner ran in
    label: str = ""
    processes: list[ProcRecord] = field(default_factory=list)
    links: list[LinkRecord] = field(default_factory=list)
    netns_records: list[NetnsRecord] = field(default_factory=list)
    named_netns: list[str] = field(default_factory=list)

    def owner_alive(self) -> bool:
        """True if the process that wrote this file is still running."""
        return self.owner is not None and proc_matches(self.owner.pid, self.owner.start)


def read_state(path: Path) -> StateRecords:
    """Parse a state file (a truncated last line, left by a crash, is ignored)."""
    rec = StateRecords(path=Path(path))
    links: dict[tuple[str, str, int | None], LinkRecord] = {}
    procs: dict[tuple[int, int], ProcRecord] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = r.get("kind")
            if kind == "owner":
                rec.owner = ProcRecord(r["pid"], r["start"], "owner")
                rec.netns = r.get("netns")
                rec.label = r.get("label", "")
            elif kind == "process":
                procs[(r["pid"], r["start"])] = ProcRecord(r["pid"], r["start"], r.get("role", ""))
            elif kind in ("link", "bridge"):
                key = (kind, r["name"], r.get("netns_pid"))
                old = links.get(key)
                new = LinkRecord(
                    name=r["name"],
                    kind=kind,
                    ifindex=r.get("ifindex"),
                    after_ifindex=r.get("after_ifindex", 0),
                    netns_pid=r.get("netns_pid"),
                    netns_start=r.get("netns_start"),
                    role=r.get("role", ""),
                )
                if old is not None and new.ifindex is None:
                    new.ifindex = old.ifindex
                if old is not None and not new.after_ifindex:
                    new.after_ifindex = old.after_ifindex
                links[key] = new
            elif kind == "netns":
                rec.netns_records.append(
                    NetnsRecord(r["pid"], r["start"], r["inode"], r.get("role", ""))
                )
            elif kind == "named_netns":
                rec.named_netns.append(r["name"])
    rec.processes = list(procs.values())
    rec.links = list(links.values())
    return rec


class StateFile:
    """The append-only record of one run (one net). Thread-safe; cheap (one write a record).

    Create with :meth:`create`; record with the ``record_*`` methods *before* (devices) or
    right after (processes: their PID exists only then) creation; call :meth:`remove`
    after a clean teardown.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )

    @classmethod
    def create(cls, label: str = "net", directory: Path | None = None) -> StateFile:
        """A new state file in ``directory`` (default :func:`state_dir`), owned by this
        process; ``label`` is free text (e.g. the scenario) kept in the header."""
        directory = Path(directory) if directory else state_dir()
        directory.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        name = f"run-{pid}-{next(_counter)}-{secrets.token_hex(2)}{STATE_SUFFIX}"
        sf = cls(directory / name)
        sf._append(
            {
                "kind": "owner",
                "pid": pid,
                "start": proc_start_time(pid),
                "netns": netns_inode(),
                "label": label,
                "time": time.time(),
            }
        )
        return sf

    def _append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError(f"state file {self.path} is closed")
            os.write(self._fd, data)

    def record_process(self, pid: int, role: str = "") -> ProcRecord:
        """Record a process just started (e.g. ``Popen.pid``); returns its identity.
        Raises ProcessLookupError if it already exited."""
        start = proc_start_time(pid)
        if start is None:
            raise ProcessLookupError(f"process {pid} ({role}) is not running")
        self._append({"kind": "process", "pid": pid, "start": start, "role": role})
        return ProcRecord(pid, start, role)

    def record_link(
        self,
        name: str,
        *,
        ifindex: int | None = None,
        kind: str = "link",
        netns_pid: int | None = None,
        role: str = "",
    ) -> None:
        """Record a device: call once with ``ifindex=None`` before creating it (in the
        state file's namespace, that also stores the current highest ifindex), and again
        with its ifindex once it exists. ``netns_pid``: a process in the namespace that
        holds it, if not the state file's own."""
        rec: dict[str, Any] = {"kind": kind, "name": name, "role": role}
        if ifindex is not None:
            rec["ifindex"] = ifindex
        elif netns_pid is None:
            rec["after_ifindex"] = max_ifindex()
        if netns_pid is not None:
            rec["netns_pid"] = netns_pid
            rec["netns_start"] = proc_start_time(netns_pid)
        self._append(rec)

    def record_bridge(self, name: str, *, ifindex: int | None = None, role: str = "") -> None:
        """Record a Linux bridge (same protocol as :meth:`record_link`)."""
        self.record_link(name, ifindex=ifindex, kind="bridge", role=role)

    def record_netns(self, pid: int, role: str = "") -> NetnsRecord:
        """Record the (anonymous) network namespace that process ``pid`` owns."""
        start = proc_start_time(pid)
        inode = netns_inode(pid)
        if start is None or inode is None:
            raise ProcessLookupError(f"process {pid} ({role}) is not running")
        self._append({"kind": "netns", "pid": pid, "start": start, "inode": inode, "role": role})
        return NetnsRecord(pid, start, inode, role)

    def record_named_netns(self, name: str) -> None:
        """Record a named namespace (``ip netns add NAME``) before creating it."""
        self._append({"kind": "named_netns", "name": name})

    def read(self) -> StateRecords:
        """Parse what has been recorded so far."""
        return read_state(self.path)

    def close(self) -> None:
        """Stop recording (the file stays)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        """Close and delete the file (after everything it lists is gone)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --------------------------------------------------------------------------- cleanup


@dataclass
class CleanupReport:
    """What :func:`cleanup_recorded` did. Lists hold PIDs or device names."""

    files: list[str] = field(default_factory=list)
    skipped_live: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    deleted_links: list[str] = field(default_factory=list)
    deleted_bridges: list[str] = field(default_factory=list)
    deleted_named_netns: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # what could not be removed, and why

    @property
    def clean(self) -> bool:
        """True if nothing recorded was left behind."""
        return not self.left


def _kill_all(procs: Iterable[ProcRecord], timeout_s: float, report: CleanupReport) -> None:
    """SIGTERM the verified processes, SIGKILL those still alive after ``timeout_s``."""
    procs = list(procs)
    alive = [p for p in procs if proc_matches(p.pid, p.start)]
    was_alive = {p.pid for p in alive}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
        deadline = time.monotonic() + timeout_s
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if proc_matches(p.pid, p.start)]
            if alive:
                time.sleep(0.01)
        if not alive:
            break
    for p in procs:
        if proc_matches(p.pid, p.start):
            report.left.append(f"process {p.pid} ({p.role}): still alive")
        elif p.pid in was_alive and p.pid not in report.killed:
            report.killed.append(p.pid)


def _device_is_ours(rec: LinkRecord) -> bool:
    idx = link_ifindex(rec.name)
    if idx is None:
        return False
    if rec.ifindex is not None:
        return idx == rec.ifindex
    return idx > rec.after_ifindex > 0


def cleanup_file(
    path: Path,
    *,
    include_live: bool = False,
    timeout_s: float = 2.0,
    report: CleanupReport | None = None,
) -> CleanupReport:
    """Remove what one state file lists (see :func:`cleanup_recorded`)."""
    report = report if report is not None else CleanupReport()
    rec = read_state(path)
    if rec.owner_alive() and not include_live and rec.owner and rec.owner.pid != os.getpid():
        report.skipped_live.append(str(path))
        return report
    report.files.append(str(path))
    n_left = len(report.left)
    # Processes inside recorded host namespaces, found through their verified owner.
    members: list[ProcRecord] = []
    for ns in rec.netns_records:
        if proc_matches(ns.pid, ns.start) and netns_inode(ns.pid) == ns.inode:
            for pid in pids_in_netns(ns.inode):
                start = proc_start_time(pid)
                if start is not None and start >= ns.start and pid != os.getpid():
                    members.append(ProcRecord(pid, start, f"in netns of {ns.role}"))
    # 1. Forwarders: their TAP devices vanish with them.
    fwd = [p for p in rec.processes if p.role.startswith("forwarder")]
    _kill_all(fwd, timeout_s, report)
    # 2. Root-namespace devices, while their peers' namespaces still exist: deleting a
    #    veth end removes the pair at once, whereas a dying namespace takes its devices
    #    (and their peers) down asynchronously.
    same_ns = rec.netns is None or rec.netns == netns_inode()
    for link in sorted(rec.links, key=lambda r: r.kind == "bridge"):
        if link.netns_pid is not None:
            continue  # inside a host namespace: goes away with it
        if not same_ns:
            report.left.append(f"{link.kind} {link.name}: recorded in another namespace")
            continue
        if not _device_is_ours(link):
            continue
        subprocess.run(["ip", "link", "del", "dev", link.name], capture_output=True, check=False)
        if link_ifindex(link.name) is None:
            (report.deleted_bridges if link.kind == "bridge" else report.deleted_links).append(
                link.name
            )
        else:
            report.left.append(f"{link.kind} {link.name}: could not delete")
    # 3. Host shells, switch shells and everything else recorded or inside host namespaces.
    _kill_all([*(p for p in rec.processes if p not in fwd), *members], timeout_s, report)
    for ns in rec.netns_records:
        if pids_in_netns(ns.inode) and not proc_matches(ns.pid, ns.start):
            # The owner is gone, so the inode may since name someone else's namespace:
            # report it, never kill on an inode alone.
            report.left.append(f"netns {ns.inode} ({ns.role}): processes remain, owner gone")
    for name in rec.named_netns:
        if Path(f"/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
            if Path(f"/run/netns/{name}").exists():
                report.left.append(f"netns {name}: could not delete")
            else:
                report.deleted_named_netns.append(name)
    if len(report.left) == n_left:  # everything this file lists is gone
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
    return report


def cleanup_recorded(
    directory: Path | None = None,
    *,
    include_live: bool = False,
    paths: Iterable[Path] | None = None,
    timeout_s: float = 2.0,
) -> CleanupReport:
    """Remove everything listed in the state files of ``directory`` (default
    :func:`state_dir`), or in ``paths`` only.

    Files whose owner process is still running belong to a live run and are skipped unless
    ``include_live`` (this process's own files are always processed). Safe to run at any
    time, also after a SIGKILLed run, and idempotent: a file is deleted once everything it
    lists is gone. Returns a :class:`CleanupReport`; ``report.clean`` says whether anything
    recorded was left.
    """
    report = CleanupReport()
    if paths is None:
        d = Path(directory) if directory else state_dir()
        paths = sorted(d.glob(f"*{STATE_SUFFIX}")) if d.is_dir() else []
    for p in paths:
        if Path(p).exists():
            cleanup_file(Path(p), include_live=include_live, timeout_s=timeout_s, report=report)
    return report
