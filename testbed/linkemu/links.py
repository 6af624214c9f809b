"""The emulated link: :class:`EmuLink`, one class for both backends, and the handling of
its userspace forwarder process (:mod:`testbed.tapfwd`, ``tap`` backend).

A link's parameters are a :class:`~testbed.linkparams.LinkSpec` (numbers: Mbit/s, ms, %,
packets; ``up`` = node1 -> node2) from construction to the forwarder's command line or
the tc interface (:class:`~testbed.linkemu.nodes.EmuTCIntf`), which alone turns them into
TCLink's strings. :func:`~testbed.linkemu.build_net` passes each link its ``spec``;
Mininet-style code may instead give TCLink's options (``bw``, ``delay='20ms'``, ...,
``params1``/``params2`` per direction), parsed once here.

``tap``: two TAP devices, one created in each node's namespace, joined by one forwarder
process per link that applies, per direction, loss -> drop-tail queue -> serialisation at
the rate -> one-way delay (+ jitter, no reordering). A direction with a
:class:`~testbed.linkparams.RateTrace` follows it (the forwarder reads the trace file
itself, with the same parser); its trace clock starts at ``trace_epoch`` (the net's, from
:func:`~testbed.linkemu.build_net`) or when the forwarder starts. The ``tc`` backend
refuses trace-driven links.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mininet.link import Intf, Link
from mininet.node import Node

from testbed.linkemu.backend import LinkEmulationError, resolve_backend, trace_needs_tap
from testbed.linkemu.nodes import IFNAMSIZ, EmuIntf, EmuTCIntf, default_state, record_node
from testbed.linkparams import (
    EMULATION_KEYS,
    ETH_FRAME_BYTES,
    TC_ONLY_KEYS,
    DirectionParams,
    LinkParamError,
    LinkSpec,
)
from testbed.state import StateFile, link_ifindex

#: TAP ring size (packets): the default 500 drops frames silently at 100 Mbit/s.
TAP_TXQUEUELEN = 10000
#: Seconds to wait for a forwarder's READY line.
FORWARDER_START_TIMEOUT_S = 10.0
FORWARDER_PATH = Path(__file__).parent.parent / "tapfwd.py"
#: Release frames this much early (us), on top of twice the wake-up lateness each
#: forwarder measures (see tapfwd.run); 20 us was best on the project's 2-core VMs.
FORWARDER_EARLY_US = float(os.environ.get("SPECFED_TAPFWD_EARLY_US", "20"))
#: SCHED_FIFO priority of forwarders (0 = normal scheduling): without it a busy CPU (LLM
#: workers) delays forwarding by a scheduler slice, 3-4 ms spikes.
FORWARDER_RT_PRIORITY = int(os.environ.get("SPECFED_TAPFWD_RT_PRIORITY", "1"))
#: Longest serialisation (ms) of a GSO super-frame the forwarder may receive whole.
GSO_BURST_MS = 1.0


class EmuLink(Link):
    """A Mininet link on either backend (see the module docstring), shaped per direction.

    Arguments beyond Mininet's ``Link``: ``spec`` (a :class:`~testbed.linkparams.LinkSpec`,
    ``up`` = node1 -> node2; unset queues are filled from the BDP), or instead TCLink's
    options (``bw``, ``delay``, ``jitter``, ``loss``, ``max_queue_size``) given directly
    (both directions) or in ``params1`` (node1 -> node2) / ``params2`` (node2 -> node1);
    ``backend`` (``'tc'``/``'tap'``/``'auto'``/None = :func:`resolve_backend`), ``state``
    (a :class:`~testbed.state.StateFile`; default: the process-wide one), ``queue_rtt_ms``
    (the RTT to size default queues for; default: this link's own RTT), ``seed``
    (loss/jitter random seed, TAP backend), ``trace_epoch`` (time.monotonic() at which
    the traces of trace-driven directions start; default: when the forwarder starts).
    After construction ``spec`` holds the effective LinkSpec (queues filled in),
    ``backend`` the backend used and ``trace_start_mono_s`` the trace clock's start
    (None without a trace).
    """

    def __init__(
        self,
        node1: Node,
        node2: Node,
        port1: int | None = None,
        port2: int | None = None,
        intfName1: str | None = None,
        intfName2: str | None = None,
        addr1: str | None = None,
        addr2: str | None = None,
        params1: Mapping[str, Any] | None = None,
        params2: Mapping[str, Any] | None = None,
        *,
        spec: LinkSpec | None = None,
        backend: str | None = None,
        state: StateFile | None = None,
        queue_rtt_ms: float | None = None,
        seed: int | None = None,
        trace_epoch: float | None = None,
        **params: Any,
    ) -> None:
        self.backend = resolve_backend(backend)
        self.seed = seed
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.forwarder_pid: int | None = None
        self.trace_epoch = trace_epoch
        self.trace_start_mono_s: float | None = None
        name = f"link {node1.name}<->{node2.name}"
        params.pop("intf", None)  # Mininet's default intf class: we choose our own
        p1 = {**params, **(params1 or {})}
        p2 = {**params, **(params2 or {})}
        if self.backend == "tap":
            for key in TC_ONLY_KEYS:
                if key in p1 or key in p2:
                    raise LinkParamError(f"{name}: option {key!r} needs the tc backend")
        self.spec = link_spec(spec, p1, p2, node1.name, node2.name).with_default_queues(
            queue_rtt_ms
        )
        if self.backend == "tc" and self.spec.has_trace:
            raise LinkEmulationError(trace_needs_tap(name))
        self.state = state or default_state()
        for node in (node1, node2):
            record_node(self.state, node)
        if self.backend == "tc":
            p1["egress"] = self.spec.up  # what node1 sends
            p2["egress"] = self.spec.down
            cls: type[Intf] = EmuTCIntf
        else:
            cls = EmuIntf
        self._veth: tuple[str, Node, int | None] | None = None  # (name, node, ifindex)
        try:
            super().__init__(
                node1,
                node2,
                port1=port1,
                port2=port2,
                intfName1=intfName1,
                intfName2=intfName2,
                addr1=addr1,
                addr2=addr2,
                cls1=cls,
                cls2=cls,
                params1=p1,
                params2=p2,
                fast=True,
            )
        except BaseException:
            self._undo()
            raise

    def _undo(self) -> None:
        """Remove what a half-built link created (now, not when its namespace dies)."""
        self.stop_forwarder()
        if self._veth is not None:
            name, node, idx = self._veth
            if node.inNamespace:
                node.cmd(f"ip link del dev {name}")
            elif idx is not None and link_ifindex(name) == idx:
                subprocess.run(["ip", "link", "del", "dev", name], capture_output=True, check=False)
            self._veth = None

    def intfName(self, node: Node, n: int) -> str:
        """Tagged names for root-namespace ports of an :class:`EmuBridge`."""
        port_name = getattr(node, "port_name", None)
        if callable(port_name):
            return str(port_name(n))
        return super().intfName(node, n)

    # Link.__init__ calls this to create the two interfaces.
    def makeIntfPair(
        self,
        intfname1: str,
        intfname2: str,
        addr1: str | None = None,
        addr2: str | None = None,
        node1: Node | None = None,
        node2: Node | None = None,
        deleteIntfs: bool = True,
    ) -> None:
        assert node1 is not None and node2 is not None
        for name, node in ((intfname1, node1), (intfname2, node2)):
            if len(name.encode()) > IFNAMSIZ:
                raise LinkEmulationError(
                    f"interface name {name!r} ({node.name}) is longer than {IFNAMSIZ} bytes"
                )
            if not node.inNamespace and link_ifindex(name) is not None:
                raise LinkEmulationError(
                    f"interface {name} ({node.name}) already exists in "
                    "the root namespace (not ours: left alone)"
                )
        if self.backend == "tc":
            self._make_veth(intfname1, intfname2, addr1, addr2, node1, node2)
        else:
            self._start_forwarder(intfname1, intfname2, node1, node2)

    def _record_intf(self, name: str, node: Node, ifindex: int | None, role: str) -> None:
        if node.inNamespace:
            self.state.record_link(name, ifindex=ifindex, netns_pid=node.pid, role=role)
        else:
            self.state.record_link(name, ifindex=ifindex, role=role)

    def _make_veth(
        self, n1: str, n2: str, addr1: str | None, addr2: str | None, node1: Node, node2: Node
    ) -> None:
        for name, node in ((n1, node1), (n2, node2)):
            self._record_intf(name, node, None, "veth")
        from mininet.util import makeIntfPair

        makeIntfPair(n1, n2, addr1, addr2, node1, node2, deleteIntfs=False)
        self._veth = (n1, node1, None)  # deleting one end deletes the pair
        for name, node in ((n1, node1), (n2, node2)):
            if not node.inNamespace:
                idx = link_ifindex(name)
                self._record_intf(name, node, idx, "veth")
                self._veth = (name, node, idx)

    def _start_forwarder(self, n1: str, n2: str, node1: Node, node2: Node) -> None:
        up, down = self.spec.up, self.spec.down
        cmd = [
            sys.executable,
            "-I",
            "-S",
            str(FORWARDER_PATH),
            "--name-a",
            n1,
            "--name-b",
            n2,
            "--parent",
            str(os.getpid()),
            "--txqueuelen",
            str(TAP_TXQUEUELEN),
            "--early-us",
            repr(FORWARDER_EARLY_US),
            "--rt-priority",
            str(FORWARDER_RT_PRIORITY),
        ]
        if node1.inNamespace:
            cmd += ["--netns-a", str(node1.pid)]
        if node2.inNamespace:
            cmd += ["--netns-b", str(node2.pid)]
        for tag, d in (("ab", up), ("ba", down)):
            cmd += [
                f"--bw-{tag}",
                repr(d.bw_mbit or 0.0),
                f"--delay-{tag}",
                repr(d.delay_ms),
                f"--jitter-{tag}",
                repr(d.jitter_ms),
                f"--loss-{tag}",
                repr(d.loss_pct),
                f"--queue-{tag}",
                str(d.max_queue_size),
            ]
        cmd += ["--gso-segs-a", str(gso_segments(up)), "--gso-segs-b", str(gso_segments(down))]
        epoch: float | None = None
        if self.spec.has_trace:
            epoch = self.trace_epoch if self.trace_epoch is not None else time.monotonic()
            cmd += ["--trace-epoch", repr(epoch)]
            for tag, d in (("ab", up), ("ba", down)):
                if d.trace is not None:
                    cmd += d.trace.forwarder_args(tag)
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        stats_dir = os.environ.get("SPECFED_TAPFWD_STATS_DIR")
        if stats_dir:
            cmd += ["--stats", str(Path(stats_dir) / f"{n1}--{n2}.json")]
        for name, node in ((n1, node1), (n2, node2)):
            self._record_intf(name, node, None, "tap")
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        self.forwarder = proc
        self.forwarder_pid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            self.state.record_process(proc.pid, role=f"forwarder {n1}<->{n2}")
        line = read_first_line(proc, FORWARDER_START_TIMEOUT_S)
        if not line.startswith("READY"):
            self.stop_forwarder()
            raise LinkEmulationError(
                f"link {node1.name}<->{node2.name}: forwarder failed: {line or 'no output'}"
            )
        _, _pid, idx1, idx2 = line.split()
        self._record_intf(n1, node1, int(idx1), "tap")
        self._record_intf(n2, node2, int(idx2), "tap")
        self.trace_start_mono_s = epoch

    def stop_forwarder(self, timeout_s: float = 2.0) -> None:
        """End the forwarder (its TAP devices vanish with it)."""
        proc, self.forwarder = self.forwarder, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def forwarder_cpu_s(self) -> float | None:
        """CPU time (user + system, s) used by this link's forwarder so far."""
        if self.forwarder is None or self.forwarder.poll() is not None:
            return None
        with open(f"/proc/{self.forwarder.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def delete(self) -> None:
        """Stop the forwarder (TAP) or delete the veth pair (tc), detach the interfaces."""
        self.stop_forwarder()
        super().delete()


def link_spec(
    spec: LinkSpec | None,
    params1: dict[str, Any],
    params2: dict[str, Any],
    name1: str,
    name2: str,
) -> LinkSpec:
    """The LinkSpec of link ``name1 <-> name2`` (``up`` = name1 -> name2): ``spec``, or
    the TCLink-style options in ``params1`` / ``params2`` (each direction's interface
    options, popped from them) parsed once. Giving both raises :class:`LinkParamError`;
    a ``spec`` that is no LinkSpec raises :class:`TypeError`."""
    where = f"link {name1}<->{name2}"
    options = [{k: p.pop(k) for k in EMULATION_KEYS if k in p} for p in (params1, params2)]
    if spec is not None:
        if not isinstance(spec, LinkSpec):
            raise TypeError(
                f"{where}: spec must be a LinkSpec, got {type(spec).__name__} "
                "(build one with LinkSpec.from_options(...) or LinkSpec.symmetric(...))"
            )
        given = sorted({k for o in options for k in o})
        if given:
            raise LinkParamError(
                f"{where}: give spec= or TCLink-style options ({', '.join(given)}), not both"
            )
        return spec
    up = DirectionParams.from_options(options[0], where=f"{where} ({name1}->{name2})")
    down = DirectionParams.from_options(options[1], where=f"{where} ({name2}->{name1})")
    return LinkSpec(up=up, down=down)


def gso_segments(d: DirectionParams) -> int:
    """Largest GSO super-frame (segments) the forwarder accepts for direction ``d``.

    A super-frame is forwarded whole, so its first segment arrives late by up to
    (N-1) x 1514 bytes / rate: N is capped to :data:`GSO_BURST_MS` of serialisation at
    the rate (1 = single frames, below ~25 Mbit/s). Lossy directions and queues under
    64 packets get single frames (loss stays per packet; a super-frame fits the queue).
    Without a rate limit there is no serialisation: 65535 (no cap). Trace-driven
    directions get single frames (a Mahimahi opportunity carries one packet's bytes; a
    CSV step's loss is per packet).
    """
    if d.trace is not None:
        return 1
    if d.loss_pct > 0 or (d.max_queue_size is not None and d.max_queue_size < 64):
        return 1
    if d.bw_mbit is None:
        return 65535
    return max(1, int(d.bw_mbit * 1e3 * GSO_BURST_MS / (8 * ETH_FRAME_BYTES)))


def read_first_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """First line of ``proc``'s stdout, or '' on timeout or EOF."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").split("\n", 1)[0].strip()
