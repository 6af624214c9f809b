"""Emulated links for Mininet: TCLink where the kernel has netem, a userspace TAP link where not.

:class:`EmuLink` takes Mininet ``TCLink``'s options (``bw`` Mbit/s, ``delay`` one-way,
``jitter``, ``loss`` %, ``max_queue_size`` packets; see :mod:`testbed.linkparams`), per
direction through Mininet's ``params1``/``params2``: ``params1`` shapes what node1 sends
(node1 -> node2), ``params2`` what node2 sends; options given directly apply to both.

Two backends, chosen once per process by :func:`resolve_backend` (override with
``SPECFED_LINK_BACKEND=auto|tc|tap``):

``tc``
    Mininet's TCLink path (veth pair, HTB rate, netem delay/jitter/loss). Needs the netem
    qdisc; on a kernel without it a link that asks for delay, jitter or loss is refused
    (TCLink itself would silently ignore them).
``tap``
    two TAP devices, one created in each node's namespace, joined by one forwarder process
    per link (:mod:`testbed.tapfwd`) that applies, per direction, loss -> drop-tail queue
    -> serialisation at the rate -> one-way delay (+ jitter, no reordering).

Queues default to ``max(2 x BDP, 64)`` packets (:func:`testbed.linkparams.default_queue_packets`).
:func:`build_net` builds and starts a whole Mininet net (LinuxBridge switches, no
controller) from a ``Topo`` and per-link parameters, records everything it creates in a
state file (:mod:`testbed.state`) and pins TCP settings in every host
(:func:`configure_tcp`).

Names: switch bridges and their ports live in the root namespace and carry a per-net tag
(``sf1a2b-s1``, ``sf1a2b-s1-3``) so they cannot collide with anything else on the machine;
host interfaces keep Mininet's names (``w1-eth0``) inside the host namespaces.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mininet.link import Intf, Link, TCIntf
from mininet.net import Mininet
from mininet.node import Host, Node
from mininet.nodelib import LinuxBridge
from mininet.topo import Topo

from testbed.linkparams import (
    EMULATION_KEYS,
    ETH_FRAME_BYTES,
    TC_ONLY_KEYS,
    DirectionParams,
    LinkParamError,
    LinkSpec,
)
from testbed.state import (
    CleanupReport,
    StateFile,
    cleanup_file,
    link_ifindex,
    netns_inode,
    proc_matches,
)

BACKEND_ENV = "SPECFED_LINK_BACKEND"
BACKENDS = ("tc", "tap")
#: TAP ring size (packets): the default 500 drops frames silently at 100 Mbit/s.
TAP_TXQUEUELEN = 10000
#: Seconds to wait for a forwarder's READY line.
FORWARDER_START_TIMEOUT_S = 10.0
FORWARDER_PATH = Path(__file__).with_name("tapfwd.py")
#: Release frames this much early (us), on top of twice the wake-up lateness each
#: forwarder measures (see tapfwd.run); 20 us was best on the project's 2-core VMs.
FORWARDER_EARLY_US = float(os.environ.get("SPECFED_TAPFWD_EARLY_US", "20"))
#: SCHED_FIFO priority of forwarders (0 = normal scheduling): without it a busy CPU (LLM
#: workers) delays forwarding by a scheduler slice, 3-4 ms spikes.
FORWARDER_RT_PRIORITY = int(os.environ.get("SPECFED_TAPFWD_RT_PRIORITY", "1"))
IFNAMSIZ = 15  # longest interface name, bytes
#: Longest serialisation (ms) of a GSO super-frame the forwarder may receive whole.
GSO_BURST_MS = 1.0


class LinkEmulationError(RuntimeError):
    """A link could not be set up as asked (the message names the link and the cause)."""


# --------------------------------------------------------------------------- backends


@functools.cache
def netem_available() -> bool:
    """True if the kernel has the netem qdisc. Probed once per process (cached).

    As root: add a netem qdisc to ``lo`` of a throw-away network namespace
    (``unshare --net``): nothing outlives the probe. Otherwise: read
    ``CONFIG_NET_SCH_NETEM`` from /proc/config.gz or /boot/config-<release>.
    """
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("tc"):
        r = subprocess.run(
            [
                "unshare",
                "--net",
                "--",
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
            capture_output=True,
            check=False,
            timeout=10,
        )
        return r.returncode == 0
    return _config_has_netem()


def _config_has_netem() -> bool:
    import gzip

    candidates: list[tuple[Path, Callable[[Path], str]]] = [
        (Path("/proc/config.gz"), lambda p: gzip.decompress(p.read_bytes()).decode()),
        (Path(f"/boot/config-{os.uname().release}"), lambda p: p.read_text()),
    ]
    for path, read in candidates:
        with contextlib.suppress(OSError):
            text = read(path)
            return any(
                line.strip() in ("CONFIG_NET_SCH_NETEM=y", "CONFIG_NET_SCH_NETEM=m")
                for line in text.splitlines()
            )
    return False


def resolve_backend(requested: str | None = None) -> str:
    """The backend to use: ``requested``, else ``$SPECFED_LINK_BACKEND``, else ``auto``;
    ``auto`` means ``tc`` if :func:`netem_available`, else ``tap``."""
    choice = (requested or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice == "auto":
        return "tc" if netem_available() else "tap"
    if choice not in BACKENDS:
        raise LinkEmulationError(
            f"link backend {choice!r} (from {'argument' if requested else BACKEND_ENV}): "
            f"expected auto, {' or '.join(BACKENDS)}"
        )
    return choice


def link_backend(obj: Any) -> str:
    """Which backend a link or a whole net used: ``'tc'``, ``'tap'``, ``'mixed'``,
    ``'veth'`` (plain Mininet links) or ``'none'`` (no links). For result metadata."""
    if isinstance(obj, EmuLink):
        return obj.backend
    if isinstance(obj, EmuNet):
        obj = obj.net
    links = getattr(obj, "links", None)
    if links is None:
        raise TypeError(f"link_backend: expected an EmuLink, EmuNet or Mininet, got {obj!r}")
    kinds = {link.backend if isinstance(link, EmuLink) else "veth" for link in links}
    if not kinds:
        return "none"
    return kinds.pop() if len(kinds) == 1 else "mixed"


# --------------------------------------------------------------------------- state

_default_state: StateFile | None = None


def default_state() -> StateFile:
    """The state file for nodes and links created outside :func:`build_net` (one per
    process, created on first use)."""
    global _default_state
    if _default_state is None:
        _default_state = StateFile.create(label="default")
        atexit.register(cleanup_file, _default_state.path, include_live=True)
    return _default_state


class _Recorder:
    """Records node shells and their namespaces once each (per state file)."""

    _seen: dict[tuple[str, int], bool] = {}  # noqa: RUF012 - process-wide memo

    @classmethod
    def node(cls, state: StateFile, node: Node) -> None:
        if node.pid is None:
            return
        key = (str(state.path), int(node.pid))
        if key in cls._seen:
            return
        kind = "host" if node.inNamespace else "switch"
        state.record_process(node.pid, role=f"{kind} {node.name}")
        if node.inNamespace:
            state.record_netns(node.pid, role=f"host {node.name}")
        cls._seen[key] = True


# --------------------------------------------------------------------------- nodes


class EmuHost(Host):
    """A Mininet host whose shell (and so its namespace) is recorded in a state file."""

    def __init__(self, name: str, state: StateFile | None = None, **params: Any) -> None:
        self.state = state or default_state()
        super().__init__(name, **params)

    def startShell(self, mnopts: Any = None) -> None:
        super().startShell(mnopts)
        _Recorder.node(self.state, self)

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        """Mininet's ``popen`` (a process in this host's namespace, in its own session, so
        it outlives a crash of the caller), recorded in the state file."""
        proc: subprocess.Popen[Any] = super().popen(*args, **kwargs)
        with contextlib.suppress(ProcessLookupError):
            self.state.record_process(proc.pid, role=f"process in {self.name}")
        return proc


class EmuBridge(LinuxBridge):
    """Mininet's LinuxBridge with a tagged, recorded bridge device.

    The bridge device is ``<tag>-<name>`` (e.g. ``sf1a2b-s1``), its ports
    ``<tag>-<name>-<port>``; ``net['s1']`` still finds the switch. ``start`` refuses to
    reuse an existing device of that name, ``stop`` deletes only the one it created.
    """

    _index = 0

    def __init__(
        self, name: str, state: StateFile | None = None, tag: str | None = None, **params: Any
    ) -> None:
        self.state = state or default_state()
        self.tag = tag or _process_tag()
        EmuBridge._index += 1
        self.bridge_name = f"{self.tag}-{name}"
        if len(self.bridge_name) > IFNAMSIZ:
            self.bridge_name = f"{self.tag}-b{EmuBridge._index}"
        self._short = f"{self.tag}{EmuBridge._index}"
        self.bridge_ifindex: int | None = None
        params.setdefault("dpid", f"{EmuBridge._index:x}")  # LinuxBridge ignores it
        super().__init__(name, **params)
        _Recorder.node(self.state, self)

    def port_name(self, port: int) -> str:
        """Root-namespace name of this bridge's port number ``port``."""
        name = f"{self.bridge_name}-{port}"
        return name if len(name) <= IFNAMSIZ else f"{self._short}-{port}"

    def start(self, _controllers: Any) -> None:
        """Create the bridge, enslave every port, bring it up."""
        br = self.bridge_name
        if link_ifindex(br) is not None:
            raise LinkEmulationError(
                f"switch {self.name}: a device {br} already exists (not ours: left alone)"
            )
        self.state.record_bridge(br, role=f"switch {self.name}")
        _ip("link", "add", "name", br, "type", "bridge", what=f"switch {self.name}")
        self.bridge_ifindex = link_ifindex(br)
        self.state.record_bridge(br, ifindex=self.bridge_ifindex, role=f"switch {self.name}")
        for intf in self.intfList():
            if intf.name != "lo":
                _ip(
                    "link",
                    "set",
                    "dev",
                    intf.name,
                    "master",
                    br,
                    "up",
                    what=f"switch {self.name} port {intf.name}",
                )
        _ip("link", "set", "dev", br, "up", what=f"switch {self.name}")

    def stop(self, deleteIntfs: bool = True) -> None:
        """Delete the bridge (only if it is still the one created), stop the shell."""
        idx = self.bridge_ifindex
        if idx is not None and link_ifindex(self.bridge_name) == idx:
            subprocess.run(
                ["ip", "link", "del", "dev", self.bridge_name], capture_output=True, check=False
            )
        self.bridge_ifindex = None
        # skip LinuxBridge.stop (brctl delbr by name); Switch/Node.stop end the shell
        super(LinuxBridge, self).stop(deleteIntfs)


def _ip(*args: str, what: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise LinkEmulationError(f"{what}: ip {' '.join(args)}: {r.stderr.strip()}")


@functools.cache
def _process_tag() -> str:
    return "sf" + secrets.token_hex(2)


# --------------------------------------------------------------------------- interfaces


class EmuIntf(Intf):
    """Interface of a TAP link: it vanishes with its forwarder, so ``delete`` only
    detaches it from its node (no ``ip link del`` by name)."""

    def delete(self) -> None:
        self.node.delIntf(self)
        self.link = None


class EmuTCIntf(TCIntf):
    """TCIntf that fails loudly instead of logging and carrying on.

    ``max_queue_size`` means the same as in the TAP backend: packets waiting for the link.
    netem counts the packets in its delay line too, so ``rate x delay`` packets are added
    to its limit; without netem (rate only) the queue is a ``pfifo`` under HTB.
    """

    def config(
        self,
        bw: float | None = None,
        delay: str | None = None,
        jitter: str | None = None,
        loss: float | None = None,
        max_queue_size: int | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        needs_netem = bool(delay or jitter or loss)
        if needs_netem and not netem_available():
            raise LinkEmulationError(
                f"interface {self.name}: delay/jitter/loss need the netem qdisc, which this "
                "kernel lacks; use SPECFED_LINK_BACKEND=tap (or auto)"
            )
        queue = max_queue_size
        if needs_netem and queue is not None and bw:
            one_way_s = (_ms(delay) + _ms(jitter)) / 1e3
            queue += int(bw * 1e6 * one_way_s / (8 * ETH_FRAME_BYTES)) + 1
        result = super().config(
            bw=bw,
            delay=delay,
            jitter=jitter,
            loss=loss,
            max_queue_size=queue if needs_netem else None,
            **params,
        )
        outputs = (result or {}).get("tcoutputs", [])
        if not needs_netem and queue is not None and bw:
            outputs.append(
                self.tc(f"%s qdisc add dev %s parent 5:1 handle 10: pfifo limit {queue}")
            )
        bad = [
            line.strip()
            for o in outputs
            for line in o.splitlines()
            if line.strip() and not line.strip().startswith("Warning")
        ]
        if bad:
            raise LinkEmulationError(f"interface {self.name}: tc failed: {bad[0]}")
        return result or {}


def _ms(value: Any) -> float:
    from testbed.linkparams import parse_time_ms

    return parse_time_ms(value)


# --------------------------------------------------------------------------- the link


class EmuLink(Link):
    """A Mininet link with TCLink's options on either backend (see the module docstring).

    Arguments beyond Mininet's ``Link``: ``backend`` (``'tc'``/``'tap'``/``'auto'``/None =
    :func:`resolve_backend`), ``state`` (a :class:`~testbed.state.StateFile`; default: the
    process-wide one), ``queue_rtt_ms`` (the RTT to size default queues for; default: this
    link's own RTT), ``seed`` (loss/jitter random seed, TAP backend). After construction
    ``spec`` holds the effective :class:`~testbed.linkparams.LinkSpec` (``up`` = node1 ->
    node2, queues filled in) and ``backend`` the backend used.
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
        backend: str | None = None,
        state: StateFile | None = None,
        queue_rtt_ms: float | None = None,
        seed: int | None = None,
        **params: Any,
    ) -> None:
        self.backend = resolve_backend(backend)
        self.state = state or default_state()
        self.seed = seed
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.forwarder_pid: int | None = None
        name = f"link {node1.name}<->{node2.name}"
        params.pop("intf", None)  # Mininet's default intf class: we choose our own
        p1 = {**params, **(params1 or {})}
        p2 = {**params, **(params2 or {})}
        if self.backend == "tap":
            for key in TC_ONLY_KEYS:
                if key in p1 or key in p2:
                    raise LinkParamError(f"{name}: option {key!r} needs the tc backend")
        up = DirectionParams.from_options(
            {k: p1.pop(k) for k in EMULATION_KEYS if k in p1},
            where=f"{name} ({node1.name}->{node2.name})",
        )
        down = DirectionParams.from_options(
            {k: p2.pop(k) for k in EMULATION_KEYS if k in p2},
            where=f"{name} ({node2.name}->{node1.name})",
        )
        self.spec = LinkSpec(up=up, down=down).with_default_queues(queue_rtt_ms)
        for node in (node1, node2):
            _Recorder.node(self.state, node)
        if self.backend == "tc":
            p1.update(self.spec.up.to_options())
            p2.update(self.spec.down.to_options())
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


def gso_segments(d: DirectionParams) -> int:
    """Largest GSO super-frame (segments) the forwarder accepts for direction ``d``.

    A super-frame is forwarded whole, so its first segment arrives late by up to
    (N-1) x 1514 bytes / rate: N is capped to :data:`GSO_BURST_MS` of serialisation at
    the rate (1 = single frames, below ~25 Mbit/s). Lossy directions and queues under
    64 packets get single frames (loss stays per packet; a super-frame fits the queue).
    Without a rate limit there is no serialisation: 65535 (no cap).
    """
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


# --------------------------------------------------------------------------- TCP settings


@dataclass(frozen=True)
class TcpSettings:
    """TCP settings pinned in every host namespace (they are per namespace, and users'
    kernels differ: Debian defaults to cubic, this project's machines to bbr).

    ``congestion_control``: net.ipv4.tcp_congestion_control (default ``bbr``);
    ``slow_start_after_idle``: net.ipv4.tcp_slow_start_after_idle (default 0: a connection
    idle between rounds keeps its window instead of restarting from the initial one).
    """

    congestion_control: str = "bbr"
    slow_start_after_idle: int = 0

    def sysctls(self) -> dict[str, str]:
        """The sysctl keys and values this stands for."""
        return {
            "net.ipv4.tcp_congestion_control": self.congestion_control,
            "net.ipv4.tcp_slow_start_after_idle": str(int(self.slow_start_after_idle)),
        }


class TcpConfigError(RuntimeError):
    """A TCP sysctl could not be set in a host (e.g. an unknown congestion control)."""


def configure_tcp(
    hosts: Iterable[Node],
    settings: TcpSettings | None = None,
) -> dict[str, dict[str, str]]:
    """Set ``settings`` (default :class:`TcpSettings`) in each host's namespace and read
    them back. Returns ``{host: {sysctl key: value read back}}`` for the run metadata;
    raises :class:`TcpConfigError` naming the host if a value did not stick."""
    want = (settings or TcpSettings()).sysctls()
    assign = " ".join(f"{k}={v}" for k, v in want.items())
    keys = " ".join(want)
    result: dict[str, dict[str, str]] = {}
    for host in hosts:
        out = host.cmd(f"sysctl -q -w {assign} >/dev/null 2>&1; sysctl -n {keys}")
        got = dict(zip(want, out.split(), strict=False))
        if got != want:
            allowed = host.cmd("sysctl -n net.ipv4.tcp_allowed_congestion_control").split()
            hint = ""
            if want["net.ipv4.tcp_congestion_control"] not in allowed:
                hint = (
                    f"; a network namespace may only choose one of the root namespace's "
                    f"net.ipv4.tcp_allowed_congestion_control ({' '.join(allowed)})"
                )
            raise TcpConfigError(f"host {host.name}: wanted {want}, got {got}{hint}")
        result[host.name] = got
    return result


# --------------------------------------------------------------------------- build_net

LinkKey = str | tuple[str, str]
#: Per-link parameters: host name or (node1, node2) -> LinkSpec or TCLink-style options.
LinkParams = Mapping[LinkKey, Any] | Mapping[str, Any] | Mapping[tuple[str, str], Any]


@dataclass
class EmuNet:
    """A started net and what is needed to record and tear it down.

    ``net``: the Mininet object; ``backend``: :func:`link_backend` of the net; ``tcp``: the
    values :func:`configure_tcp` read back per host; ``links``: the effective
    :class:`LinkSpec` per link, keyed ``(node1, node2)`` with ``up`` = node1 -> node2;
    ``state``: the run's state file; ``setup_s``: build + start time in seconds.
    """

    net: Mininet
    backend: str
    tcp: dict[str, dict[str, str]]
    links: dict[tuple[str, str], LinkSpec]
    state: StateFile
    setup_s: float
    _down: bool = field(default=False, repr=False)

    def teardown(self) -> CleanupReport:
        """Stop the net (Mininet's ``net.stop()``), then make sure everything recorded is
        gone and remove the state file. Idempotent."""
        if self._down:
            return CleanupReport()
        self._down = True
        try:
            self.net.stop()
        finally:
            report = cleanup_file(self.state.path, include_live=True)
            self.state.close()
        return report

    def cleanup_at_exit(self) -> None:
        """Registered with ``atexit``: if the net was never torn down, remove what its
        state file lists (without Mininet, which may be half gone at exit)."""
        if not self._down:
            self._down = True
            with contextlib.suppress(Exception):
                cleanup_file(self.state.path, include_live=True)
                self.state.close()

    def link_metadata(self) -> list[dict[str, Any]]:
        """One dict per link (nodes, backend, both directions' parameters) for results."""
        return [
            {"node1": a, "node2": b, "backend": self.backend, **spec.as_dict()}
            for (a, b), spec in self.links.items()
        ]

    def __enter__(self) -> EmuNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def _resolve_specs(
    topo: Topo, link_params: LinkParams, default: LinkSpec
) -> dict[tuple[str, str], LinkSpec]:
    """Map each topology link (node1, node2) to its LinkSpec oriented node1 -> node2."""
    hosts = set(topo.hosts())
    links = [(a, b) for a, b in topo.links(sort=True)]
    by_host: dict[str, list[tuple[str, str]]] = {}
    for a, b in links:
        for n in (a, b):
            if n in hosts:
                by_host.setdefault(n, []).append((a, b))
    specs = {}
    for a, b in links:
        info = topo.linkInfo(a, b)
        own = {k: info[k] for k in EMULATION_KEYS if k in info}
        specs[(a, b)] = (
            LinkSpec.from_options(own, where=f"topology link {a}-{b}") if own else default
        )
    for key, value in link_params.items():
        if isinstance(key, tuple):
            x, y = key
            if (x, y) in specs:
                specs[(x, y)] = LinkSpec.from_options(value, where=f"link {x}-{y}")
            elif (y, x) in specs:
                specs[(y, x)] = LinkSpec.from_options(value, where=f"link {x}-{y}").reversed()
            else:
                raise LinkParamError(f"link_params: no link {x}-{y} in the topology")
            continue
        if key not in by_host:
            raise LinkParamError(f"link_params: {key!r} is not a host of the topology")
        if len(by_host[key]) != 1:
            raise LinkParamError(
                f"link_params: host {key!r} has {len(by_host[key])} links; "
                "key them by (node1, node2) instead"
            )
        a, b = by_host[key][0]
        spec = LinkSpec.from_options(value, where=f"link of {key}")
        specs[(a, b)] = spec if a == key else spec.reversed()
    return specs


def build_net(
    topo: Topo,
    link_params: LinkParams | None = None,
    *,
    default: LinkSpec | Mapping[str, Any] | None = None,
    backend: str | None = None,
    tcp: TcpSettings | None = None,
    label: str = "net",
    state_dir: Path | None = None,
    seed: int | None = None,
    ip_base: str = "10.0.0.0/8",
) -> EmuNet:
    """Build and start a Mininet net from ``topo`` with :class:`EmuLink` links,
    :class:`EmuBridge` switches (no controller) and :class:`EmuHost` hosts.

    ``link_params`` maps a host name (its only link, ``up`` = host -> switch) or a
    ``(node1, node2)`` pair (``up`` = node1 -> node2) to a :class:`LinkSpec` or to
    TCLink-style options (``{"bw": 10, "delay": "5ms", "up": {...}, "down": {...}}``).
    Other links get ``default`` (no shaping if None) or the options the topology gave
    them. Default queues are sized for the longest two-link path through each link (its
    RTT plus the largest other link RTT), which is right for stars. TCP is pinned with
    :func:`configure_tcp` (``tcp``, default :class:`TcpSettings`). Everything created is
    recorded in a new state file (``state_dir``, default :func:`testbed.state.state_dir`);
    on error the partial net is torn down before the exception propagates.
    """
    t0 = time.monotonic()
    chosen = resolve_backend(backend)
    default_spec = (
        LinkSpec.from_options(default, where="default") if default is not None else LinkSpec()
    )
    specs = _resolve_specs(topo, link_params or {}, default_spec)
    state = StateFile.create(label=label, directory=state_dir)
    tag = _fresh_tag()
    net = Mininet(
        topo=None,
        switch=functools.partial(EmuBridge, state=state, tag=tag),
        host=functools.partial(EmuHost, state=state),
        link=functools.partial(EmuLink, backend=chosen, state=state, seed=seed),
        controller=None,
        build=False,
        ipBase=ip_base,
        waitConnected=False,
    )
    emu = EmuNet(net=net, backend=chosen, tcp={}, links={}, state=state, setup_s=0.0)
    atexit.register(emu.cleanup_at_exit)
    try:
        for name in topo.hosts():
            net.addHost(name, **topo.nodeInfo(name))
        for name in topo.switches():
            info = dict(topo.nodeInfo(name))
            info.pop("cls", None)
            net.addSwitch(name, **info)
        rtts = {k: s.rtt_ms + 2 * max(s.up.jitter_ms, s.down.jitter_ms) for k, s in specs.items()}
        for (a, b), spec in specs.items():
            others = [r for k, r in rtts.items() if k != (a, b)]
            queue_rtt = rtts[(a, b)] + (max(others) if others else 0.0)
            info = {
                k: v
                for k, v in topo.linkInfo(a, b).items()
                if k not in ("node1", "node2", *EMULATION_KEYS)
            }
            full = spec.with_default_queues(queue_rtt)
            params1 = {**info.pop("params1", {}), **full.up.to_options()}
            params2 = {**info.pop("params2", {}), **full.down.to_options()}
            link = net.addLink(a, b, params1=params1, params2=params2, **info)
            emu.links[(a, b)] = link.spec
        net.build()
        net.start()
        emu.tcp = configure_tcp(net.hosts, tcp)
    except BaseException:
        emu.teardown()
        raise
    emu.backend = link_backend(net)
    emu.setup_s = time.monotonic() - t0
    return emu


def _fresh_tag() -> str:
    """A device-name tag (``sf`` + 4 hex digits) that no root-namespace device uses."""
    names = os.listdir("/sys/class/net")
    while True:
        tag = "sf" + secrets.token_hex(2)
        if not any(n.startswith(tag) for n in names):
            return tag


__all__ = [
    "BACKEND_ENV",
    "EmuBridge",
    "EmuHost",
    "EmuIntf",
    "EmuLink",
    "EmuNet",
    "EmuTCIntf",
    "LinkEmulationError",
    "TcpConfigError",
    "TcpSettings",
    "build_net",
    "configure_tcp",
    "default_state",
    "link_backend",
    "netem_available",
    "netns_inode",
    "proc_matches",
    "resolve_backend",
]
