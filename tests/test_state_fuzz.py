"""State files that are corrupt, foreign or half written (no root needed).

Two parts:

- the cases seen in the field, each against real processes: a non-UTF-8 line, a line that
  is not a JSON object, a record without a pid, a pid as a string, a file with no owner
  line; one bad file must neither crash ``cleanup_recorded`` (nor ``testbed clean``) nor
  stop it from cleaning the other files;
- a hypothesis fuzz of the reader against a fake machine (``/proc``, ``kill``, ``ip``
  replaced by tables): arbitrary bytes and mutated records never raise out of cleanup,
  and cleanup never acts on a record it could not parse or on a file whose owner is not
  known to be dead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import testbed.state as S
from testbed.state import StateFile, cleanup_recorded, proc_start_time, read_state


@pytest.fixture
def victims() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes that a crashed run might have left (killed at the end if alive)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _sleeper(victims: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["sleep", "60"])
    victims.append(p)
    return p


def _dead_pid() -> tuple[int, int]:
    """(pid, start) of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = proc_start_time(child.pid)
    child.wait()
    assert start is not None
    return child.pid, start


def _crashed_file(directory: Path, *extra: bytes) -> Path:
    """A state file of a crashed run (owner dead), with ``extra`` raw lines appended."""
    sf = StateFile.create(label="crashed", directory=directory)
    sf.close()
    header = json.loads(sf.path.read_text().splitlines()[0])
    header["pid"], header["start"] = _dead_pid()
    sf.path.write_bytes(json.dumps(header).encode() + b"\n" + b"".join(extra))
    return sf.path


def _proc_line(p: subprocess.Popen[bytes], **override: Any) -> bytes:
    rec: dict[str, Any] = {"kind": "process", "pid": p.pid, "start": proc_start_time(p.pid)}
    rec.update(override)
    return json.dumps({k: v for k, v in rec.items() if v is not ...}).encode() + b"\n"


# --------------------------------------------------------------------------- field cases

BAD_LINES = {
    "non-utf8": b'{"kind": "process", "role": "\xff\xfe"}\n',
    "not-an-object": b'["kind", "process"]\n',
    "a-number": b"42\n",
    "no-pid": b'{"kind": "process", "start": 1}\n',
}


@pytest.mark.parametrize("bad", sorted(BAD_LINES))
def test_bad_line_is_reported_and_the_rest_cleaned(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]], bad: str
) -> None:
    """A bad record is skipped and reported; the good records of the same file and of
    the other files are still cleaned, and nothing raises."""
    v1, v2 = _sleeper(victims), _sleeper(victims)
    bad_file = _crashed_file(tmp_path, _proc_line(v1), BAD_LINES[bad])
    good_file = _crashed_file(tmp_path, _proc_line(v2))
    report = cleanup_recorded(tmp_path)
    assert v1.wait(timeout=5) != 0 and v2.wait(timeout=5) != 0
    assert sorted(report.killed) == sorted([v1.pid, v2.pid])
    assert len(report.bad_records) == 1 and report.bad_records[0].startswith(f"{bad_file}:3:")
    assert not good_file.exists()
    assert bad_file.exists()  # kept for a look: not everything it lists could be checked
    assert not report.clean


def test_pid_as_string_is_never_acted_on(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]]
) -> None:
    v = _sleeper(victims)
    _crashed_file(tmp_path, _proc_line(v, pid=str(v.pid)))
    report = cleanup_recorded(tmp_path)
    assert v.poll() is None and report.killed == []
    assert "pid" in report.bad_records[0]


@pytest.mark.parametrize("value", [True, -1, 0, 1.0, None, 2**40])
def test_odd_pids_are_never_acted_on(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]], value: object
) -> None:
    """``kill(-1)`` would signal every process, ``kill(0)`` our own group: such records
    (and booleans, floats, out-of-range numbers) are refused."""
    v = _sleeper(victims)
    _crashed_file(tmp_path, _proc_line(v, pid=value))
    report = cleanup_recorded(tmp_path)
    assert v.poll() is None and report.killed == [] and len(report.bad_records) == 1


def test_file_without_owner_is_left_alone(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]]
) -> None:
    """No owner line: the run may be alive (or the file half written); never kill."""
    v = _sleeper(victims)
    path = tmp_path / f"run-x{S.STATE_SUFFIX}"
    path.write_bytes(_proc_line(v))
    report = cleanup_recorded(tmp_path)
    assert v.poll() is None and report.killed == []
    assert path.exists() and report.skipped and str(path) in report.skipped[0]
    assert not report.clean


@pytest.mark.parametrize(
    "owner",
    [
        b'{"kind": "owner", "pid": "123", "start": 5}\n',
        b'{"kind": "owner", "start": 5}\n',
        b'{"kind": "owner", "pid": 123}\n',
        b'{"kind": "owner", "pid": 123, "start": 5, "netns": "x"}\n',
        b'{"kind": "owner", "pid": 12\n',  # truncated, then more records
        b"\xff\xfe\n",
    ],
)
def test_unreadable_owner_is_left_alone(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]], owner: bytes
) -> None:
    v = _sleeper(victims)
    path = tmp_path / f"run-y{S.STATE_SUFFIX}"
    path.write_bytes(owner + _proc_line(v))
    report = cleanup_recorded(tmp_path)
    assert v.poll() is None and report.killed == [] and path.exists() and report.skipped


def test_two_owner_lines_are_left_alone(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]]
) -> None:
    """Two owners (e.g. two files concatenated): which one to believe is unknown."""
    v = _sleeper(victims)
    path = _crashed_file(tmp_path, _proc_line(v))
    header = path.read_bytes().splitlines(keepends=True)[0]
    path.write_bytes(path.read_bytes() + header.replace(b'"crashed"', b'"other"'))
    report = cleanup_recorded(tmp_path)
    assert v.poll() is None and report.skipped


def test_unreadable_file_does_not_stop_the_others(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]]
) -> None:
    v = _sleeper(victims)
    d = tmp_path / f"a-directory{S.STATE_SUFFIX}"  # glob matches it, open() fails
    d.mkdir()
    good = _crashed_file(tmp_path, _proc_line(v))
    report = cleanup_recorded(tmp_path)
    assert v.wait(timeout=5) != 0 and not good.exists()
    assert any(str(d) in s for s in report.skipped)


def test_truncated_last_line_is_not_a_problem(
    tmp_path: Path, victims: list[subprocess.Popen[bytes]]
) -> None:
    """A crash mid-write leaves a last line without newline: expected, not reported."""
    v = _sleeper(victims)
    path = _crashed_file(tmp_path, _proc_line(v), b'{"kind": "process", "pid": 12')
    rec = read_state(path)
    assert rec.problems == [] and rec.truncated
    report = cleanup_recorded(tmp_path)
    assert v.wait(timeout=5) != 0 and report.clean and not path.exists()


def test_testbed_clean_reports_instead_of_crashing(
    tmp_path: Path,
    victims: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``testbed clean`` with one corrupt file among good ones: no traceback, the good
    file cleaned, the bad one named in the output, exit status 1."""
    from testbed.cli import main

    v = _sleeper(victims)
    monkeypatch.setenv(S.STATE_DIR_ENV, str(tmp_path))
    bad = tmp_path / f"run-bad{S.STATE_SUFFIX}"
    bad.write_bytes(b"\x80\x81 not json\n")
    good = _crashed_file(tmp_path, _proc_line(v))
    assert main(["clean"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert v.wait(timeout=5) != 0 and not good.exists()
    assert out["killed"] == [v.pid] and any(str(bad) in s for s in out["skipped"])


# --------------------------------------------------------------------------- fuzz

ROOT_NS = 4026531840
OWNER_PID = 900  # dead in the fake machine
GOOD_PIDS = range(1000, 1100)  # pids of well-formed records
BAD_PIDS = range(5000, 5100)  # pids that appear only in malformed records


class FakeMachine:
    """/proc, kill(2), ``ip`` and sysfs of a pretend machine: every pid of GOOD_PIDS and
    BAD_PIDS runs (start time = pid), every device named in a record exists."""

    def __init__(self) -> None:
        self.running = {pid: pid for pid in [*GOOD_PIDS, *BAD_PIDS]}
        self.killed: list[int] = []
        self.commands: list[list[str]] = []
        self.devices: dict[str, int] = {}

    def proc_start_time(self, pid: int) -> int | None:
        return self.running.get(pid)

    def kill(self, pid: int, sig: int) -> None:
        assert isinstance(pid, int) and pid > 0, f"kill({pid!r})"
        self.killed.append(pid)
        self.running.pop(pid, None)

    def run(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess[bytes]:
        self.commands.append(list(argv))
        if argv[:3] == ["ip", "link", "del"]:
            self.devices.pop(argv[-1], None)
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    def link_ifindex(self, name: str) -> int | None:
        return self.devices.get(name)

    def netns_inode(self, pid: int | str = "self") -> int | None:
        return ROOT_NS if pid == "self" else 7000 + int(pid)

    def pids_in_netns(self, inode: int) -> list[int]:
        return []


good_names = st.from_regex(r"\Agood[a-z0-9]{1,8}\Z")
#: names `ip` must never be handed: empty, a path, too long (> 15 bytes), blanks, NUL
BAD_NAMES = st.sampled_from(["", ".", "..", "bad/x", "../../x", "bad" + "x" * 13, "bad x", "bad\0"])
roles = st.text(max_size=10)


@st.composite
def good_record(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["process", "link", "bridge", "netns", "named_netns"]))
    pid = draw(st.sampled_from(GOOD_PIDS))
    if kind == "process":
        return {"kind": kind, "pid": pid, "start": pid, "role": draw(roles)}
    if kind == "netns":
        return {"kind": kind, "pid": pid, "start": pid, "inode": 7000 + pid}
    if kind == "named_netns":
        return {"kind": kind, "name": draw(good_names)}
    return {"kind": kind, "name": draw(good_names), "ifindex": draw(st.integers(1, 50))}


def _bad_value(draw: st.DrawFn, old: object) -> object:
    return draw(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-(2**70), 0),
            st.integers(2**32, 2**70),
            st.floats(allow_nan=True),
            st.text(max_size=5),
            st.just(str(old)),
            st.lists(st.integers(), max_size=2),
            st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        )
    )


@st.composite
def bad_record(draw: st.DrawFn) -> bytes:
    """A record that must be refused: a required field missing or of the wrong type
    (its pids from BAD_PIDS, its names start with 'bad'), or garbage bytes."""
    rec = draw(good_record())
    for key in ("pid", "start", "inode"):
        if key in rec:
            rec[key] = draw(st.sampled_from(BAD_PIDS)) + (7000 if key == "inode" else 0)
    if "start" in rec:
        rec["start"] = rec["pid"]
    if "name" in rec:
        rec["name"] = "bad" + rec["name"][4:]
    required = {
        "process": ["pid", "start"],
        "netns": ["pid", "start", "inode"],
        "named_netns": ["name"],
        "link": ["name", "ifindex"],
        "bridge": ["name", "ifindex"],
    }[rec["kind"]]
    key = draw(st.sampled_from(required))
    if draw(st.booleans()):
        del rec[key]
    elif key == "name":
        rec[key] = draw(st.one_of(BAD_NAMES, st.integers(), st.none(), st.booleans()))
    else:
        rec[key] = _bad_value(draw, rec[key])
    line = json.dumps(rec).encode()
    if draw(st.booleans()):
        garbage = draw(st.binary(max_size=40).filter(lambda b: b"\n" not in b))
        line = draw(st.sampled_from([garbage, line[: len(line) // 2], garbage + line]))
    return line


@st.composite
def bad_owner(draw: st.DrawFn) -> bytes:
    """An owner line that must be refused: pid, start or netns missing or wrong."""
    hdr: dict[str, Any] = {"kind": "owner", "pid": OWNER_PID, "start": 1, "netns": ROOT_NS}
    key = draw(st.sampled_from(["pid", "start", "netns"]))
    if key != "netns" and draw(st.booleans()):
        del hdr[key]
    else:
        hdr[key] = draw(
            st.one_of(
                st.booleans(),
                st.text(max_size=5),
                st.just(str(hdr[key])),
                st.floats(),
                st.integers(-(2**70), -1 if key == "start" else 0),
                st.lists(st.integers(), max_size=2),
            )
        )
    line = json.dumps(hdr).encode()
    return draw(st.sampled_from([line, line[: len(line) // 2], b"\xff" + line]))


@st.composite
def state_file(draw: st.DrawFn) -> tuple[bytes, bool, list[dict[str, Any]]]:
    """(file bytes, owner line present and well-formed, the well-formed records)."""
    owner = draw(st.sampled_from(["ok", "missing", "bad"]))
    lines: list[bytes] = []
    good: list[dict[str, Any]] = []
    if owner == "ok":
        hdr = {"kind": "owner", "pid": OWNER_PID, "start": 1, "netns": ROOT_NS, "label": "x"}
        lines.append(json.dumps(hdr).encode())
    elif owner == "bad":
        lines.append(draw(bad_owner()))
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            rec = draw(good_record())
            good.append(rec)
            lines.append(json.dumps(rec).encode())
        else:
            lines.append(draw(bad_record()))
    first = lines[0] if lines else b""
    if draw(st.booleans()):
        draw(st.randoms()).shuffle(lines)
    owner_ok = owner == "ok" and lines[0] == first  # the owner record must come first
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b""])), owner_ok, good


def _run_fuzz(data: bytes) -> FakeMachine:
    m = FakeMachine()
    for rec in ({"name": n} for n in ("good0", "bad0")):
        m.devices[rec["name"]] = 1
    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        path = Path(d) / f"run-fuzz{S.STATE_SUFFIX}"
        path.write_bytes(data)
        # every named device exists with ifindex 1..50 matching what good records say
        for text in data.split(b"\n"):
            try:
                r = json.loads(text)
                name, idx = r["name"], r.get("ifindex")
            except Exception:
                continue
            if isinstance(name, str) and isinstance(idx, int) and not isinstance(idx, bool):
                m.devices[name] = idx
            elif isinstance(name, str) and name.startswith("good"):
                m.devices[name] = 99
        mp.setattr(S, "proc_start_time", m.proc_start_time)
        mp.setattr(S, "link_ifindex", m.link_ifindex)
        mp.setattr(S, "netns_inode", m.netns_inode)
        mp.setattr(S, "pids_in_netns", m.pids_in_netns)
        mp.setattr(S.os, "kill", m.kill)
        mp.setattr(S.subprocess, "run", m.run)
        report = cleanup_recorded(Path(d), timeout_s=0.0)
        assert isinstance(report.clean, bool)
    return m


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_file())
def test_fuzz_cleanup_acts_only_on_parsed_records(
    case: tuple[bytes, bool, list[dict[str, Any]]],
) -> None:
    data, owner_ok, good = case
    m = _run_fuzz(data)
    good_pids = {r["pid"] for r in good if r["kind"] == "process"}
    assert all(pid in good_pids for pid in m.killed), (m.killed, good_pids)
    for argv in m.commands:
        assert argv[-1].startswith("good"), argv  # never a name from a bad record
    if not owner_ok:
        assert m.killed == [] and m.commands == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_fuzz_arbitrary_bytes_never_raise(noise: bytes, with_owner: bool) -> None:
    hdr = {"kind": "owner", "pid": OWNER_PID, "start": 1, "netns": ROOT_NS}
    data = (json.dumps(hdr).encode() + b"\n" if with_owner else b"") + noise
    m = _run_fuzz(data)
    assert m.killed == [] and m.commands == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=6))
def test_fuzz_text_lines_never_raise(lines: list[str]) -> None:
    hdr = {"kind": "owner", "pid": OWNER_PID, "start": 1, "netns": ROOT_NS}
    data = "\n".join([json.dumps(hdr), *lines]).encode("utf-8", "surrogatepass")
    m = _run_fuzz(data)
    assert m.killed == [] and m.commands == []


def test_fake_machine_sees_good_records_acted_on() -> None:
    """The fuzz harness can fail: a dead owner's good records are acted on."""
    hdr = {"kind": "owner", "pid": OWNER_PID, "start": 1, "netns": ROOT_NS}
    lines = [
        hdr,
        {"kind": "process", "pid": 1001, "start": 1001},
        {"kind": "bridge", "name": "good1", "ifindex": 3},
    ]
    m = _run_fuzz(b"".join(json.dumps(r).encode() + b"\n" for r in lines))
    assert m.killed == [1001] and m.commands == [["ip", "link", "del", "dev", "good1"]]
