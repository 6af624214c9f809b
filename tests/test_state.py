"""Unit tests (no root needed): state file round trips and cleanup safety rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.state import (
    StateFile,
    cleanup_recorded,
    link_ifindex,
    max_ifindex,
    netns_inode,
    proc_matches,
    proc_start_time,
    read_state,
    state_dir,
)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child process to record and (maybe) have cleaned up."""
    p = subprocess.Popen(["sleep", "60"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def dead_owner_file(directory: Path) -> StateFile:
    """A state file whose owner is a process that has exited (like a crashed run)."""
    sf = StateFile.create(label="crashed", directory=directory)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    start = proc_start_time(child.pid)
    child.wait()
    lines = sf.path.read_text().splitlines()
    header = json.loads(lines[0])
    header.update(pid=child.pid, start=start)
    sf.path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    return sf


def test_state_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECFED_STATE_DIR", str(tmp_path))
    assert state_dir() == tmp_path
    monkeypatch.delenv("SPECFED_STATE_DIR")
    assert state_dir().name == ".state"


def test_proc_identity(sleeper: subprocess.Popen[bytes]) -> None:
    start = proc_start_time(sleeper.pid)
    assert start is not None and proc_matches(sleeper.pid, start)
    assert not proc_matches(sleeper.pid, start + 1)  # a recycled PID is someone else
    assert proc_start_time(2**22 + 12345) is None


def test_round_trip(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    sf = StateFile.create(label="demo", directory=tmp_path)
    proc = sf.record_process(sleeper.pid, role="forwarder a<->b")
    sf.record_link("sf0000-s1-1")  # before creation
    sf.record_link("sf0000-s1-1", ifindex=4242)  # once it exists
    sf.record_link("w1-eth0", netns_pid=os.getpid(), ifindex=2)
    sf.record_bridge("sf0000-s1")
    ns = sf.record_netns(os.getpid(), role="host w1")
    sf.record_named_netns("sf-test")
    with open(sf.path, "a", encoding="utf-8") as f:
        f.write('{"kind": "process", "pid": 12')  # a crash mid-write
    rec = read_state(sf.path)
    assert rec.owner is not None and rec.owner.pid == os.getpid() and rec.owner_alive()
    assert rec.label == "demo" and rec.netns == netns_inode()
    assert rec.processes == [proc]
    links = {(r.kind, r.name): r for r in rec.links}
    s1 = links[("link", "sf0000-s1-1")]
    assert s1.ifindex == 4242 and 0 < s1.after_ifindex <= max_ifindex()
    assert links[("link", "w1-eth0")].netns_pid == os.getpid()
    assert links[("bridge", "sf0000-s1")].ifindex is None
    assert rec.netns_records == [ns] and ns.inode == netns_inode()
    assert rec.named_netns == ["sf-test"]
    sf.remove()
    assert not sf.path.exists()


def test_cleanup_after_crash_kills_only_verified(tmp_path: Path) -> None:
    victim = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        sf = dead_owner_file(tmp_path)
        sf.record_process(victim.pid, role="forwarder")
        start = proc_start_time(bystander.pid)
        assert start is not None
        with open(sf.path, "a", encoding="utf-8") as f:  # same PID, other start: not ours
            f.write(
                json.dumps(
                    {
                        "kind": "process",
                        "pid": bystander.pid,
                        "start": start - 1,
                        "role": "recycled",
                    }
                )
                + "\n"
            )
        sf.record_link("sf-none-1")  # never created
        sf.close()
        report = cleanup_recorded(tmp_path)
        assert victim.wait(timeout=5) != 0
        assert bystander.poll() is None
        assert report.killed == [victim.pid] and report.clean
        assert not sf.path.exists()
    finally:
        for p in (victim, bystander):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_cleanup_skips_live_owner(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    sf = StateFile.create(directory=tmp_path)
    sf.record_process(sleeper.pid, role="host")
    owner = subprocess.Popen(["sleep", "60"])  # pretend another live run wrote it
    try:
        lines = sf.path.read_text().splitlines()
        header = json.loads(lines[0])
        header.update(pid=owner.pid, start=proc_start_time(owner.pid))
        sf.path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
        report = cleanup_recorded(tmp_path)
        assert report.skipped_live == [str(sf.path)] and sleeper.poll() is None
        report = cleanup_recorded(tmp_path, include_live=True)
        assert sleeper.wait(timeout=5) != 0 and report.killed == [sleeper.pid]
    finally:
        owner.kill()
        owner.wait()


def test_cleanup_never_deletes_devices_that_predate_the_record(tmp_path: Path) -> None:
    lo = link_ifindex("lo")
    assert lo is not None
    sf = dead_owner_file(tmp_path)
    sf.record_link("lo")  # pending record: lo's ifindex is below the recorded maximum
    sf.record_bridge("lo", ifindex=lo + 100000)  # confirmed record, other ifindex
    report = cleanup_recorded(paths=[sf.path])
    assert link_ifindex("lo") == lo
    assert report.deleted_links == [] and report.deleted_bridges == []


def test_cleanup_of_empty_dir(tmp_path: Path) -> None:
    report = cleanup_recorded(tmp_path / "missing")
    assert report.clean and report.files == []
