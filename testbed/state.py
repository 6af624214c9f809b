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
appended with single ``write`` calls, so a crash loses at most the record being written;
the first line names the owner (the process that wrote the file).

Files that are damaged or not ours are read defensively: a record that is not UTF-8, not a
JSON object, of an unknown kind, or with a field missing or of the wrong type (a pid as a
string, a pid <= 0) is skipped and reported, never acted on, and the file is kept for a
look; a file whose owner is not known (no owner on the first line, a malformed one, two of
them) is left alone entirely, since only a run whose owner is known to be dead may be
cleaned; one bad file never stops the others from being cleaned.
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
    """Everything one state file lists (later records of the same device win).

    ``owner`` is the first line's owner record, or None when that line is missing, not a
    well-formed owner record, or contradicted by another owner record further down: then
    nobody knows whose the file is and nothing in it may be acted on. ``problems``: one
    ``"LINE: reason"`` per record that could not be parsed (skipped; line numbers from 1);
    ``truncated``: the last line had no newline and did not parse (a crash mid-write,
    expected: not a problem).
    """

    path: Path
    owner: ProcRecord | None = None
    netns: int | None = None  # inode of the namespace the owner ran in
    label: str = ""
    processes: list[ProcRecord] = field(default_factory=list)
    links: list[LinkRecord] = field(default_factory=list)
    netns_records: list[NetnsRecord] = field(default_factory=list)
    named_netns: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    owner_problem: str = ""
    truncated: bool = False

    def owner_alive(self) -> bool:
        """True if the process that wrote this file is still running."""
        return self.owner is not None and proc_matches(self.owner.pid, self.owner.start)


class RecordError(ValueError):
    """A state record that does not have the shape :class:`StateFile` writes."""


#: Largest PID Linux hands out (PID_MAX_LIMIT, 2**22).
PID_MAX = 2**22
_KINDS = ("owner", "process", "link", "bridge", "netns", "named_netns")


def _int_field(
    r: dict[str, Any], key: str, low: int, high: int, *, optional: bool = False
) -> int | None:
    """``r[key]`` as an int in [low, high] (JSON true/false and floats refused)."""
    if key not in r or (optional and r[key] is None):
        if optional:
            return None
        raise RecordError(f"{key} missing")
    v = r[key]
    if type(v) is not int or not low <= v <= high:
        raise RecordError(f"{key}: expected an integer in [{low}, {high}], got {v!r:.40}")
    return v


def _req_int(r: dict[str, Any], key: str, low: int, high: int) -> int:
    v = _int_field(r, key, low, high)
    assert v is not None
    return v


def _str_field(r: dict[str, Any], key: str) -> str:
    """Optional free text (``role``, ``label``): a string or absent."""
    v = r.get(key, "")
    if not isinstance(v, str):
        raise RecordError(f"{key}: expected a string, got {v!r:.40}")
    return v


def _name_field(r: dict[str, Any], key: str = "name") -> str:
    """A device or named-namespace name: 1-15 bytes, no '/', blank or NUL, not '.'/'..',
    so that it can only ever name one entry of /sys/class/net or /run/netns."""
    v = r.get(key)
    if not isinstance(v, str):
        raise RecordError(f"{key}: expected a device name, got {v!r:.40}")
    try:
        n = len(v.encode())
    except UnicodeEncodeError:
        n = 0
    bad_char = any(c == "/" or c.isspace() or not c.isprintable() for c in v)
    if not 0 < n <= 15 or v in (".", "..") or bad_char:
        raise RecordError(f"{key}: not a valid device name: {v!r:.40}")
    return v


_INODE_MAX = 2**64 - 1
_TICKS_MAX = 2**63 - 1
_IFINDEX_MAX = 2**31 - 1


def _parse_line(line: bytes) -> dict[str, Any]:
    """One line -> a record dict with a known ``kind``; RecordError says why not."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        r = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit
        raise RecordError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(r, dict):
        raise RecordError(f"not a JSON object ({type(r).__name__})")
    if r.get("kind") not in _KINDS:
        raise RecordError(f"unknown kind {r.get('kind')!r:.40}")
    return r


def _owner(r: dict[str, Any]) -> tuple[ProcRecord, int | None, str]:
    pid = _req_int(r, "pid", 1, PID_MAX)
    start = _req_int(r, "start", 0, _TICKS_MAX)
    netns = _int_field(r, "netns", 1, _INODE_MAX, optional=True)
    return ProcRecord(pid, start, "owner"), netns, _str_field(r, "label")


def _link(r: dict[str, Any]) -> LinkRecord:
    netns_pid = _int_field(r, "netns_pid", 1, PID_MAX, optional=True)
    return LinkRecord(
        name=_name_field(r),
        kind=r["kind"],
        ifindex=_int_field(r, "ifindex", 1, _IFINDEX_MAX, optional=True),
        after_ifindex=_int_field(r, "after_ifindex", 0, _IFINDEX_MAX, optional=True) or 0,
        netns_pid=netns_pid,
        netns_start=_int_field(r, "netns_start", 0, _TICKS_MAX, optional=True),
        role=_str_field(r, "role"),
    )


def read_state(path: Path) -> StateRecords:
    """Parse a state file, record by record.

    A line that is not UTF-8, not a JSON object, of an unknown kind or with a field
    missing or of the wrong type is skipped and listed in ``problems``; a last line
    without newline that does not parse (a crash mid-write) is skipped silently
    (``truncated``). The owner must be the first line (see :class:`StateRecords`).
    Raises OSError if the file cannot be read.
    """
    rec = StateRecords(path=Path(path))
    links: dict[tuple[str, str, int | None], LinkRecord] = {}
    procs: dict[tuple[int, int], ProcRecord] = {}
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    last_complete = data.endswith(b"\n")
    if last_complete or not lines[-1]:
        lines.pop()  # the empty string after the final newline
    for no, line in enumerate(lines, start=1):
        try:
            r = _parse_line(line)
            kind = r["kind"]
            if kind == "owner":
                owner, netns, label = _owner(r)
                if no != 1:
                    raise RecordError("owner record after the first line")
                rec.owner, rec.netns, rec.label = owner, netns, label
            elif kind == "process":
                p = ProcRecord(
                    _req_int(r, "pid", 1, PID_MAX),
                    _req_int(r, "start", 0, _TICKS_MAX),
                    _str_field(r, "role"),
                )
                procs[(p.pid, p.start)] = p
            elif kind in ("link", "bridge"):
                new = _link(r)
                key = (kind, new.name, new.netns_pid)
                old = links.get(key)
                if old is not None and new.ifindex is None:
                    new.ifindex = old.ifindex
                if old is not None and not new.after_ifindex:
                    new.after_ifindex = old.after_ifindex
                links[key] = new
            elif kind == "netns":
                rec.netns_records.append(
                    NetnsRecord(
                        _req_int(r, "pid", 1, PID_MAX),
                        _req_int(r, "start", 0, _TICKS_MAX),
                        _req_int(r, "inode", 1, _INODE_MAX),
                        _str_field(r, "role"),
                    )
                )
            else:  # named_netns
                rec.named_netns.append(_name_field(r))
        except RecordError as exc:
            if no == len(lines) and not last_complete:
                rec.truncated = True  # a crash mid-write: expected
                continue
            rec.problems.append(f"{no}: {exc}")
            if no == 1 or _safe_kind(line) == "owner":  # whose file is it? unknown
                rec.owner = None
                rec.owner_problem = f"line {no}: {exc}"
    if rec.owner is None and not rec.owner_problem:
        rec.owner_problem = "no owner record on the first line"
    rec.processes = list(procs.values())
    rec.links = list(links.values())
    return rec


def _safe_kind(line: bytes) -> str | None:
    """The ``kind`` of a line if it is a JSON object with a string kind, else None."""
    try:
        r = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    kind = r.get("kind") if isinstance(r, dict) else None
    return kind if isinstance(kind, str) else None


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
    #: "PATH: reason" per file not acted on at all: unreadable, or its owner not known
    #: (no owner line, a malformed one, two of them)
    skipped: list[str] = field(default_factory=list)
    #: "PATH:LINE: reason" per record that could not be parsed (never acted on)
    bad_records: list[str] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    deleted_links: list[str] = field(default_factory=list)
    deleted_bridges: list[str] = field(default_factory=list)
    deleted_named_netns: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # what could not be removed, and why

    @property
    def clean(self) -> bool:
        """True if nothing recorded was left behind and every file could be read whole."""
        return not self.left and not self.skipped and not self.bad_records


def _kill_all(procs: Iterable[ProcRecord], timeout_s: float, report: CleanupReport) -> None:
    """SIGTERM the verified processes, SIGKILL those still alive after ``timeout_s``."""
    procs = list(procs)
    alive = [p for p in procs if proc_matches(p.pid, p.start)]
    was_alive = {p.pid for p in alive}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in alive if proc_matches(p.pid, p.start)]  # verified just now
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
    try:
        rec = read_state(path)
    except OSError as exc:
        report.skipped.append(f"{path}: unreadable ({exc.strerror or exc})")
        return report
    if rec.owner is None:  # whose run was it? unknown: act on nothing
        report.skipped.append(f"{path}: owner unknown ({rec.owner_problem}); left alone")
        return report
    if rec.owner_alive() and not include_live and rec.owner.pid != os.getpid():
        report.skipped_live.append(str(path))
        return report
    report.files.append(str(path))
    report.bad_records.extend(f"{path}:{p}" for p in rec.problems)
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
    if rec.problems:  # what the unreadable records named may still be there
        report.left.append(
            f"{path}: kept, {len(rec.problems)} record(s) could not be read "
            "(see bad_records); check it and delete it by hand"
        )
    elif len(report.left) == n_left:  # everything this file lists is gone
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
        if not Path(p).exists():
            continue
        try:
            cleanup_file(Path(p), include_live=include_live, timeout_s=timeout_s, report=report)
        except Exception as exc:  # one bad file must not stop the others: report it
            report.skipped.append(f"{p}: cleanup failed ({type(exc).__name__}: {exc})")
    return report
