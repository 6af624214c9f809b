"""Link-emulation benchmark: accuracy per link and set-up/tear-down time; prints JSON.

    python -m testbed.linkbench [--seconds 3] [--pings 100] [--hosts 16] [--repeats 3]

1. Accuracy: stars of 1 server + 4 workers whose links span 1-100 Mbit/s and 1-100 ms
   one-way (the server's link is not shaped, so each worker<->server path measures one
   worker link). Per link: configured vs measured RTT (UDP probe, us resolution), RTT
   error against max(0.5 ms, 2 %), TCP goodput each way against 0.93 x the rate, and
   the forwarder's CPU use while it carries the upstream test.
2. Set-up and tear-down time of a star of 1 server + ``--hosts`` workers (target: <= 10 s
   together for 1 + 16).

Needs root and Mininet. Everything it builds is recorded and removed (testbed.state).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

from mininet.topo import Topo

from testbed import linkemu
from testbed.calibrate import (
    Tolerance,
    bottleneck_mbit,
    configured_rtt_ms,
    measure_goodput,
    measure_rtt,
    path_links,
)
from testbed.linkemu import EmuLink, EmuNet, build_net, netem_available
from testbed.linkparams import LinkSpec

#: (Mbit/s, one-way ms) per worker link, one star per row.
GRID: list[list[tuple[float, float]]] = [
    [(1, 100), (5, 30), (20, 10), (100, 1)],
    [(1, 1), (10, 50), (50, 5), (100, 100)],
]
RTT_ABS_MS, RTT_REL, GOODPUT_RATIO = 0.5, 0.02, 0.93


class BenchStar(Topo):
    """``srv`` and ``w1``..``wN`` on switch ``s1`` (benchmark-local topology)."""

    def build(self, n: int = 4) -> None:
        sw = self.addSwitch("s1")
        for name in ("srv", *(f"w{i}" for i in range(1, n + 1))):
            self.addLink(self.addHost(name), sw)


def _forwarder(emu: EmuNet, host: str) -> EmuLink | None:
    for link in emu.net.links:
        if isinstance(link, EmuLink) and host in (link.intf1.node.name, link.intf2.node.name):
            return link
    return None


def bench_link(
    emu: EmuNet, host: str, bw: float, delay: float, *, pings: int, seconds: float
) -> dict[str, Any]:
    """Measure one worker link (path ``host`` <-> ``srv``) and compare with its config."""
    net = emu.net
    tol = Tolerance(RTT_ABS_MS, RTT_REL, GOODPUT_RATIO)
    hops = path_links(emu, host, "srv")
    want = configured_rtt_ms(hops)
    rtt = measure_rtt(net[host], net["srv"], count=pings, interval_s=0.02, emu=emu)
    warm = min(3.0, max(0.5, 12 * want / 1e3))
    link = _forwarder(emu, host)
    cpu0 = link.forwarder_cpu_s() if link else None
    t0 = time.monotonic()
    up = measure_goodput(net[host], net["srv"], duration_s=seconds, warmup_s=warm, emu=emu)
    cpu1 = link.forwarder_cpu_s() if link else None
    wall = time.monotonic() - t0
    down = measure_goodput(net["srv"], net[host], duration_s=seconds, warmup_s=warm, emu=emu)
    up_conf, down_conf = bottleneck_mbit(hops, True), bottleneck_mbit(hops, False)
    err = rtt.mean_ms - want
    limit = tol.rtt_limit_ms(want)
    return {
        "link": host,
        "bw_mbit": bw,
        "delay_ms": delay,
        "configured_rtt_ms": round(want, 3),
        "rtt_mean_ms": round(rtt.mean_ms, 3),
        "rtt_sd_ms": round(rtt.sd_ms, 3),
        "rtt_min_ms": round(rtt.min_ms, 3),
        "rtt_max_ms": round(rtt.max_ms, 3),
        "rtt_error_ms": round(err, 3),
        "rtt_error_pct": round(100 * err / want, 2) if want else None,
        "rtt_limit_ms": round(limit, 3),
        "rtt_ok": abs(err) <= limit,
        "goodput_up_mbit": round(up.mbit, 3),
        "goodput_up_ratio": round(up.mbit / up_conf, 4) if up_conf else None,
        "goodput_down_mbit": round(down.mbit, 3),
        "goodput_down_ratio": round(down.mbit / down_conf, 4) if down_conf else None,
        "goodput_ok": all(
            g.mbit >= GOODPUT_RATIO * c for g, c in ((up, up_conf), (down, down_conf)) if c
        ),
        "retransmits_up": up.retransmits,
        "retransmits_down": down.retransmits,
        "queue_pkts": emu.links[(host, "s1")].up.max_queue_size,
        "forwarder_cpu_pct_up": round(100 * (cpu1 - cpu0) / wall, 1)
        if cpu0 is not None and cpu1 is not None
        else None,
    }


def accuracy(pings: int, seconds: float) -> list[dict[str, Any]]:
    """Run every star of :data:`GRID`; one result dict per worker link."""
    rows = []
    for i, star in enumerate(GRID, start=1):
        params = {
            f"w{j}": LinkSpec.symmetric(bw_mbit=bw, delay_ms=d) for j, (bw, d) in enumerate(star, 1)
        }
        with build_net(BenchStar(n=len(star)), params, label=f"linkbench-star{i}") as emu:
            for j, (bw, d) in enumerate(star, 1):
                row = bench_link(emu, f"w{j}", bw, d, pings=pings, seconds=seconds)
                rows.append({"star": i, **row})
                print(
                    f"star {i} w{j} {bw:g} Mbit/s {d:g} ms: RTT err {row['rtt_error_ms']:+.3f}"
                    f" ms, goodput {row['goodput_up_ratio']}/{row['goodput_down_ratio']}",
                    file=sys.stderr,
                )
    return rows


def setup_teardown(n_workers: int, repeats: int) -> list[dict[str, float]]:
    """Build + tear down a 1 + ``n_workers`` star (10 Mbit/s, 10 ms links) ``repeats``
    times; seconds for each phase."""
    runs = []
    for _ in range(repeats):
        params = {
            f"w{j}": LinkSpec.symmetric(bw_mbit=10, delay_ms=10) for j in range(1, n_workers + 1)
        }
        t0 = time.monotonic()
        emu = build_net(BenchStar(n=n_workers), params, label="linkbench-setup")
        t1 = time.monotonic()
        report = emu.teardown()
        t2 = time.monotonic()
        runs.append(
            {
                "setup_s": round(t1 - t0, 3),
                "teardown_s": round(t2 - t1, 3),
                "total_s": round(t2 - t0, 3),
                "clean": report.clean,
            }
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON on stdout (progress on stderr)."""
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m testbed.linkbench", description=__doc__.split("\n")[0]
    )
    add_version(ap)
    ap.add_argument("--seconds", type=float, default=3.0, help="goodput seconds per direction")
    ap.add_argument("--pings", type=int, default=100, help="RTT probes per link")
    ap.add_argument("--hosts", type=int, default=16, help="workers in the set-up star")
    ap.add_argument("--repeats", type=int, default=3, help="set-up/tear-down repetitions")
    ap.add_argument("--skip-accuracy", action="store_true")
    o = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("linkbench: needs root (Mininet)", file=sys.stderr)
        return 2
    rows = [] if o.skip_accuracy else accuracy(o.pings, o.seconds)
    st = setup_teardown(o.hosts, o.repeats)
    result = {
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "netem": netem_available(),
            "backend": linkemu.resolve_backend(),
            "forwarder_rt_priority": linkemu.FORWARDER_RT_PRIORITY,
            "forwarder_early_us": linkemu.FORWARDER_EARLY_US,
        },
        "targets": {
            "rtt_error": f"<= max({RTT_ABS_MS} ms, {RTT_REL:.0%})",
            "goodput_ratio": f">= {GOODPUT_RATIO}",
            "setup_plus_teardown_s": 10,
        },
        "accuracy": rows,
        "setup_teardown": {"hosts": 1 + o.hosts, "switches": 1, "runs": st},
        "summary": {
            "links": len(rows),
            "rtt_ok": sum(r["rtt_ok"] for r in rows),
            "goodput_ok": sum(r["goodput_ok"] for r in rows),
            "max_abs_rtt_error_ms": max((abs(r["rtt_error_ms"]) for r in rows), default=None),
            "min_goodput_ratio": min(
                (
                    x
                    for r in rows
                    for x in (r["goodput_up_ratio"], r["goodput_down_ratio"])
                    if x is not None
                ),
                default=None,
            ),
            "max_setup_plus_teardown_s": max(r["total_s"] for r in st),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
