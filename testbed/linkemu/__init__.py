"""Emulated links for Mininet: TCLink where the kernel has netem, a userspace TAP link where not.

A link's parameters are a :class:`~testbed.linkparams.LinkSpec` per link (numbers:
``bw_mbit`` Mbit/s, ``delay_ms`` one-way ms, ``jitter_ms``, ``loss_pct`` %,
``max_queue_size`` packets; ``up`` = node1 -> node2, ``down`` the reverse), handed from
:func:`build_net` to each :class:`EmuLink` as ``spec=``. :class:`EmuLink` also takes
Mininet ``TCLink``'s options (``bw``, ``delay='20ms'``, ...) when Mininet-style code builds
it, per direction through ``params1`` (what node1 sends) / ``params2`` (what node2 sends),
parsed once.

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

Modules, one job each:

- :mod:`~testbed.linkemu.backend`: netem probing, backend choice, :class:`LinkEmulationError`;
- :mod:`~testbed.linkemu.nodes`: recorded hosts and bridges, the interfaces of both backends;
- :mod:`~testbed.linkemu.links`: :class:`EmuLink` and its forwarder process;
- :mod:`~testbed.linkemu.net`: TCP settings, per-link spec resolution, :func:`build_net`,
  :class:`EmuNet`, :func:`link_backend`.
"""

from testbed.linkemu.backend import (
    BACKEND_ENV,
    BACKENDS,
    LinkEmulationError,
    netem_available,
    resolve_backend,
)
from testbed.linkemu.links import (
    FORWARDER_EARLY_US,
    FORWARDER_PATH,
    FORWARDER_RT_PRIORITY,
    FORWARDER_START_TIMEOUT_S,
    GSO_BURST_MS,
    TAP_TXQUEUELEN,
    EmuLink,
    gso_segments,
    link_spec,
    read_first_line,
)
from testbed.linkemu.net import (
    EmuNet,
    LinkKey,
    LinkParams,
    TcpConfigError,
    TcpSettings,
    build_net,
    configure_tcp,
    link_backend,
    queue_rtts,
    require_spec,
)
from testbed.linkemu.nodes import (
    IFNAMSIZ,
    EmuBridge,
    EmuHost,
    EmuIntf,
    EmuTCIntf,
    default_state,
    record_node,
)
from testbed.state import netns_inode, proc_matches

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "FORWARDER_EARLY_US",
    "FORWARDER_PATH",
    "FORWARDER_RT_PRIORITY",
    "FORWARDER_START_TIMEOUT_S",
    "GSO_BURST_MS",
    "IFNAMSIZ",
    "TAP_TXQUEUELEN",
    "EmuBridge",
    "EmuHost",
    "EmuIntf",
    "EmuLink",
    "EmuNet",
    "EmuTCIntf",
    "LinkEmulationError",
    "LinkKey",
    "LinkParams",
    "TcpConfigError",
    "TcpSettings",
    "build_net",
    "configure_tcp",
    "default_state",
    "gso_segments",
    "link_backend",
    "link_spec",
    "netem_available",
    "netns_inode",
    "proc_matches",
    "queue_rtts",
    "read_first_line",
    "record_node",
    "require_spec",
    "resolve_backend",
]
