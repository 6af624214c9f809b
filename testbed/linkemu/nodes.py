"""Mininet nodes and interfaces whose every shell, namespace and device is recorded.

:class:`EmuHost` (host shell + namespace recorded, ``popen`` processes recorded),
:class:`EmuBridge` (a LinuxBridge with a tagged bridge device, deleted only if it is still
the one created), the interfaces of the two backends (:class:`EmuIntf` for TAP links,
:class:`EmuTCIntf` for the tc path) and :func:`record_node`, which puts a node's shell and
namespace in a state file (:mod:`testbed.state`) once.

Names: switch bridges and their ports live in the root namespace and carry a per-net tag
(``sf1a2b-s1``, ``sf1a2b-s1-3``) so they cannot collide with anything else on the machine;
host interfaces keep Mininet's names (``w1-eth0``) inside the host namespaces.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import secrets
import subprocess
from typing import Any

from mininet.link import Intf, TCIntf
from mininet.node import Host, Node
from mininet.nodelib import LinuxBridge

from testbed.linkemu.backend import LinkEmulationError, netem_available, trace_needs_tap
from testbed.linkparams import EMULATION_KEYS, ETH_FRAME_BYTES, DirectionParams, LinkParamError
from testbed.state import StateFile, cleanup_file, link_ifindex

IFNAMSIZ = 15  # longest interface name, bytes

# --------------------------------------------------------------------------- state

_default_state: StateFile | None = None
#: (state file, shell pid) of every node already recorded (process-wide memo).
_recorded: set[tuple[str, int]] = set()


def default_state() -> StateFile:
    """The state file for nodes and links created outside
    :func:`~testbed.linkemu.build_net` (one per process, created on first use)."""
    global _default_state
    if _default_state is None:
        _default_state = StateFile.create(label="default")
        atexit.register(cleanup_file, _default_state.path, include_live=True)
    return _default_state


def record_node(state: StateFile, node: Node) -> None:
    """Record ``node``'s shell (and, for a host, its namespace) in ``state``, once per
    state file; a node without a shell yet is skipped."""
    if node.pid is None:
        return
    key = (str(state.path), int(node.pid))
    if key in _recorded:
        return
    kind = "host" if node.inNamespace else "switch"
    state.record_process(node.pid, role=f"{kind} {node.name}")
    if node.inNamespace:
        state.record_netns(node.pid, role=f"host {node.name}")
    _recorded.add(key)


# --------------------------------------------------------------------------- nodes


class EmuHost(Host):
    """A Mininet host whose shell (and so its namespace) is recorded in a state file."""

    def __init__(self, name: str, state: StateFile | None = None, **params: Any) -> None:
        self.state = state or default_state()
        super().__init__(name, **params)

    def startShell(self, mnopts: Any = None) -> None:
        super().startShell(mnopts)
        record_node(self.state, self)

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
        record_node(self.state, self)

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
    """TCIntf that takes its shaping as numbers and fails loudly instead of logging and
    carrying on.

    ``max_queue_size`` means the same as in the TAP backend: packets waiting for the link.
    netem counts the packets in its delay line too, so ``rate x delay`` packets are added
    to its limit; without netem (rate only) the queue is a ``pfifo`` under HTB.
    """

    def config(self, egress: DirectionParams | None = None, **params: Any) -> dict[str, Any]:
        """Shape what this interface sends as ``egress`` says (Mbit/s, ms, %, packets;
        :class:`~testbed.linkemu.EmuLink` passes it), then apply Mininet's other
        ``TCIntf``/``Intf`` options in ``params``.

        Mininet-style options (``bw=10, delay='5ms'``, ...) are accepted instead of
        ``egress`` and parsed once (:meth:`DirectionParams.from_options`). Numbers turn into
        TCLink's strings only here, where Mininet's ``TCIntf.config`` needs them.
        Returns Mininet's result (``{"tcoutputs": [...], ...}``, ``{}`` if nothing was set);
        raises :class:`LinkEmulationError` if tc failed or the kernel lacks netem.
        """
        d = self._egress(egress, params)
        if d.trace is not None:
            raise LinkEmulationError(trace_needs_tap(f"interface {self.name}"))
        needs_netem = bool(d.delay_ms or d.jitter_ms or d.loss_pct)
        if needs_netem and not netem_available():
            raise LinkEmulationError(
                f"interface {self.name}: delay/jitter/loss need the netem qdisc, which this "
                "kernel lacks; use SPECFED_LINK_BACKEND=tap (or auto)"
            )
        queue = d.max_queue_size
        if needs_netem and queue is not None and d.bw_mbit:
            one_way_s = (d.delay_ms + d.jitter_ms) / 1e3
            queue += int(d.bw_mbit * 1e6 * one_way_s / (8 * ETH_FRAME_BYTES)) + 1
        tc_options = d.to_options()  # the final boundary: ms -> '<x>ms' strings
        tc_options.pop("max_queue_size", None)
        result = super().config(
            **tc_options, max_queue_size=queue if needs_netem else None, **params
        )
        outputs = (result or {}).get("tcoutputs", [])
        if not needs_netem and queue is not None and d.bw_mbit:
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

    def _egress(self, egress: DirectionParams | None, params: dict[str, Any]) -> DirectionParams:
        """``egress``, or the TCLink-style options popped from ``params`` parsed once."""
        options = {k: params.pop(k) for k in EMULATION_KEYS if k in params}
        if not options:
            return egress if egress is not None else DirectionParams()
        if egress is not None:
            raise LinkParamError(
                f"interface {self.name}: give egress= or TCLink-style options "
                f"({', '.join(sorted(options))}), not both"
            )
        return DirectionParams.from_options(options, where=f"interface {self.name}")
