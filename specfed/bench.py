"""Benchmarks. Each prints one JSON document on stdout (progress goes to stderr).

    python -m specfed.bench round    server-side cost per round (decode + reconstruct +
                                     aggregate + accept), V = 151,936, gamma = 4,
                                     N in {2, 4, 8}, K in {16, 64, 256, 1024}, full;
                                     worker-side encode cost for gamma + 1 positions;
                                     the compact codecs at K = 64, N = 4 (--compact-only:
                                     those alone)
    python -m specfed.bench vs-hf    our engine vs HF generate(assistant_model=...) vs
                                     target-only, greedy, real Qwen pair
    python -m specfed.bench dtype    fp32 vs bf16 weights: speed, peak memory, outputs
    python -m specfed.bench loopback round overhead over TCP on loopback: round time minus
                                     (draft + slowest worker compute), full vs top-K,
                                     real Qwen pair, 2 worker processes
    python -m specfed.bench codecs   bytes per position vs ||p_i - p_hat_i||_1 and
                                     |Delta alpha| for every codec (value dtype x index
                                     coding, top-K and top-p) on the paper study's recorded
                                     Qwen distributions; issue 13's target (docs/codecs.md)
    python -m specfed.bench profile  a device profile (specfed.profile): times real verify
                                     passes and draft rounds of one model over a grid of
                                     tokens and contexts, fits the cost model, writes the
                                     profile with its provenance; or fits one from a run's
                                     own records (--from-run)

Timings are medians over repetitions after a warm-up that is dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import psutil
import torch

from specfed.codecs import decode_any, index_bytes_for, make_codec
from specfed.messages import Transmission
from specfed.reconstruct import RECONSTRUCTIONS, aggregate
from specfed.sampling import RoundUniforms, speculative_accept

if TYPE_CHECKING:
    from specfed.profile import Dtype

QWEN_V = 151_936


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _time_ms(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    fn()  # warm-up, dropped
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90))}


def lm_like(rng: np.random.Generator, n_pos: int, vocab: int, sharpness: float = 3.0) -> np.ndarray:
    """[n_pos, vocab] float32 distributions with an LM-like heavy head (softmax of scaled
    Gaussian logits; sharpness 3 puts roughly 60-90 % of the mass in the top 64)."""
    logits = rng.standard_normal((n_pos, vocab), dtype=np.float32) * sharpness
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


def bench_round(reps: int, threads: int, compact_only: bool = False) -> dict[str, Any]:
    """Server cost per round and worker encode cost, on synthetic LM-like distributions.

    compact_only: only the compact codecs at K = 64, N = 4 (`COMPACT_ROUND`)."""
    torch.set_num_threads(threads)
    gamma, vocab = 4, QWEN_V
    rng = np.random.default_rng(0)
    q = lm_like(rng, gamma, vocab)
    drafts = [int(r.argmax()) for r in q]
    ps = [lm_like(rng, gamma + 1, vocab) for _ in range(8)]
    uniforms = RoundUniforms.draw(rng, gamma)
    if compact_only:
        compact, compact_encode = _compact_round(ps, q, drafts, uniforms, reps)
        return {
            "benchmark": "round (compact codecs only)",
            "vocab_size": vocab,
            "gamma": gamma,
            "threads": threads,
            "reps": reps,
            "compact_server_round_N4": compact,
            "compact_worker_encode": compact_encode,
            "targets": {
                "compact_round_ms_at_N4 (<= 5)": _by_label(compact),
                "compact_encode_ms (5 positions)": {
                    r["label"]: r["median_ms"] for r in compact_encode
                },
            },
        }
    server: list[dict[str, Any]] = []
    for mode, k in [("full", None), *[("topk", k) for k in (16, 64, 256, 1024)]]:
        codec = make_codec(mode, k=k)
        messages = [codec.encode(p) for p in ps]
        recs = RECONSTRUCTIONS if mode == "topk" else ("renormalize",)
        for rec in recs:
            for n in (2, 4, 8):
                w = np.full(n, 1.0 / n)

                def one_round(msgs=messages[:n], w=w, rec=rec) -> None:
                    payloads = [decode_any(m) for m in msgs]
                    p_hat = aggregate(payloads, w, rec, q)
                    speculative_accept(drafts, q, p_hat, uniforms)

                t = _time_ms(one_round, reps)
                server.append(
                    {
                        "transmission": mode,
                        "k": k,
                        "reconstruction": rec,
                        "n_workers": n,
                        "bytes_per_worker": len(messages[0]),
                        **t,
                    }
                )
                log(f"round {mode} k={k} {rec} N={n}: {t['median_ms']:.2f} ms")
    encode = []
    for mode, k in [("full", None), *[("topk", k) for k in (16, 64, 256, 1024)]]:
        t = _time_ms(partial(make_codec(mode, k=k).encode, ps[0]), reps)
        encode.append({"transmission": mode, "k": k, "positions": gamma + 1, **t})
    compact, compact_encode = _compact_round(ps, q, drafts, uniforms, reps)
    key = {
        (r["transmission"], r["k"], r["reconstruction"], r["n_workers"]): r["median_ms"]
        for r in server
    }
    per_worker = {
        rec: (key[("topk", 64, rec, 8)] - key[("topk", 64, rec, 2)]) / 6 for rec in RECONSTRUCTIONS
    }
    return {
        "benchmark": "round",
        "vocab_size": vocab,
        "gamma": gamma,
        "threads": threads,
        "reps": reps,
        "server_round": server,
        "worker_encode": encode,
        "compact_server_round_N4": compact,
        "compact_worker_encode": compact_encode,
        "targets": {
            "round_ms_at_N4_K64 (<= 5)": {
                rec: key[("topk", 64, rec, 4)] for rec in RECONSTRUCTIONS
            },
            "compact_round_ms_at_N4 (<= 5)": _by_label(compact),
            "compact_encode_ms (5 positions)": {r["label"]: r["median_ms"] for r in compact_encode},
            "slope_ms_per_worker_K64": per_worker,
            "encode_ms_at_K64 (<= 2)": next(e["median_ms"] for e in encode if e["k"] == 64),
        },
    }


COMPACT_ROUND = [
    Transmission.of("topk", 64, value_dtype=vd, index_coding=ic)
    for vd, ic in [
        ("fp32", "fixed"),
        ("fp16", "fixed"),
        ("fp32", "delta-varint"),
        ("q8", "bitpack"),
        ("q8", "delta-varint"),
        ("q8", "delta-bitpack"),
        ("q4", "delta-bitpack"),
    ]
] + [Transmission.of("adaptive", 256, 0.01, "q8", None, "delta-bitpack")]
"""The transmissions whose round cost `round` measures at N = 4: today's fp32 and fp16 top-64
as the baseline, then the compact ones (K = 64; top-p capped at 256: on `lm_like` data it
keeps the cap, the worst case)."""


def _compact_round(
    ps: list[np.ndarray], q: np.ndarray, drafts: list[int], uniforms: RoundUniforms, reps: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Server cost per round (decode + aggregate + accept) at N = 4, worker encode cost and
    the decode of one message (gamma + 1 positions) of every `COMPACT_ROUND` transmission."""
    server, encode = [], []
    w = np.full(4, 0.25)
    for t in COMPACT_ROUND:
        codec = t.codec()
        messages = [codec.encode(p) for p in ps[:4]]
        for rec in RECONSTRUCTIONS:

            def one_round(msgs=messages, rec=rec) -> None:
                payloads = [decode_any(m) for m in msgs]
                p_hat = aggregate(payloads, w, rec, q)
                speculative_accept(drafts, q, p_hat, uniforms)

            timing = _time_ms(one_round, reps)
            server.append(
                {
                    "label": t.label,
                    "reconstruction": rec,
                    "n_workers": 4,
                    "bytes_per_worker": len(messages[0]),
                    **timing,
                }
            )
            log(f"round {t.label} {rec} N=4: {timing['median_ms']:.2f} ms")
        encode.append(
            {
                "label": t.label,
                "positions": ps[0].shape[0],
                **_time_ms(partial(codec.encode, ps[0]), reps),
                "decode_median_ms": _time_ms(partial(decode_any, messages[0]), reps)["median_ms"],
            }
        )
    return server, encode


def _by_label(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{label: {reconstruction: median ms}} of `_compact_round` rows."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["label"], {})[r["reconstruction"]] = r["median_ms"]
    return out


class PeakRSS:
    """Samples this process's resident set size every 20 ms; `.peak_gib` after the block."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.02)

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30

    @contextmanager
    def measure(self) -> Iterator[PeakRSS]:
        self.peak = self._proc.memory_info().rss
        th = threading.Thread(target=self._run, daemon=True)
        th.start()
        try:
            yield self
        finally:
            self._stop.set()
            th.join()
            self._stop.clear()


def _prompt_ids(lm: Any, spec: str) -> list[list[int]]:
    from specfed.prompts import load_prompts

    return [lm.encode(p.text) for p in load_prompts(spec)]


def _hf_generate(model: Any, ids: list[int], n: int, assistant: Any = None) -> list[int]:
    kw: dict[str, Any] = {"assistant_model": assistant} if assistant is not None else {}
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw
        )
    return [int(t) for t in out[0, len(ids) :]]


def bench_vs_hf(args: argparse.Namespace) -> dict[str, Any]:
    """Ours (1 worker, full transmission) vs HF assisted generation vs target only."""
    from specfed.engine import FederatedGenerator, LocalWorker
    from specfed.models import load_model

    torch.set_num_threads(args.threads)
    target = load_model(args.target, dtype=args.dtype)
    draft = load_model(args.draft, dtype=args.dtype)
    for m in (target.model, draft.model):
        m.generation_config.pad_token_id = target.tokenizer.eos_token_id
    prompts = _prompt_ids(target, args.prompts)
    n = args.max_new_tokens
    no_eos: frozenset[int] = frozenset()
    ours = FederatedGenerator(
        draft, [LocalWorker("w1", target)], gamma=args.gamma, temperature=0, measure_fidelity=False
    )
    methods: dict[str, Callable[[list[int]], list[int]]] = {
        "specfed": lambda ids: ours.generate(ids, n, seed=0, eos_token_ids=no_eos).tokens,
        "hf_assisted": lambda ids: _hf_generate(target.model, ids, n, draft.model),
        "hf_target_only": lambda ids: _hf_generate(target.model, ids, n),
    }
    log("warm-up (dropped)")
    for fn in methods.values():
        fn(prompts[0][:16])
    results: dict[str, Any] = {}
    outputs: dict[str, list[list[int]]] = {}
    for name, fn in methods.items():
        mem = PeakRSS()
        with mem.measure():
            t0 = time.perf_counter()
            outputs[name] = [fn(ids) for ids in prompts]
            dt = time.perf_counter() - t0
        n_tok = sum(len(o) for o in outputs[name])
        results[name] = {
            "tokens": n_tok,
            "seconds": dt,
            "tokens_per_s": n_tok / dt,
            "peak_rss_gib": mem.peak_gib,
        }
        log(f"{name}: {n_tok / dt:.2f} tok/s, peak RSS {mem.peak_gib:.2f} GiB")
    agree = {
        name: sum(a == b for a, b in zip(outputs[name], outputs["hf_target_only"], strict=True))
        / len(prompts)
        for name in methods
    }
    return {
        "benchmark": "vs-hf",
        "target": args.target,
        "draft": args.draft,
        "dtype": args.dtype,
        "threads": args.threads,
        "gamma": args.gamma,
        "prompts": args.prompts,
        "max_new_tokens": n,
        "methods": results,
        "speedup_vs_hf_assisted": results["specfed"]["tokens_per_s"]
        / results["hf_assisted"]["tokens_per_s"],
        "speedup_vs_target_only": results["specfed"]["tokens_per_s"]
        / results["hf_target_only"]["tokens_per_s"],
        "fraction_of_prompts_identical_to_target_only_greedy": agree,
    }


def _dtype_one(args: argparse.Namespace) -> dict[str, Any]:
    """One model at one dtype, alone in this process (so peak RSS is its own)."""
    import resource

    from specfed.engine import FederatedGenerator, LocalWorker
    from specfed.models import KVSession, load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    import gc

    gc.collect()
    rss_loaded = psutil.Process().memory_info().rss / 2**30
    prompts = _prompt_ids(lm, args.prompts)
    s = KVSession(lm)
    s.sync(prompts[0], 1)
    start = len(s.tokens)  # verify-shaped pass: 5 new tokens (gamma = 4) on a prefix
    t_verify = _time_ms(partial(s.forward, start, prompts[0][:5], 5), 5)
    t_step = _time_ms(partial(s.forward, start, prompts[0][:1], 1), 5)
    gen = FederatedGenerator(
        None, [LocalWorker("w", lm)], gamma=0, temperature=0, measure_fidelity=False
    )
    t0 = time.perf_counter()
    outs = [
        gen.generate(ids, args.max_new_tokens, 0, eos_token_ids=frozenset()).tokens
        for ids in prompts
    ]
    tok_s = sum(map(len, outs)) / (time.perf_counter() - t0)
    return {
        "model": args.model,
        "dtype": args.dtype,
        "load_s": load_s,
        "decode_tokens_per_s": tok_s,
        "verify_5_tokens_ms": t_verify["median_ms"],
        "one_token_step_ms": t_step["median_ms"],
        "rss_after_load_gib": rss_loaded,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tokens": outs,
    }


def bench_dtype(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 vs bf16 weights for the draft and the verifier: speed, memory, greedy outputs.

    Each (model, dtype) runs in a fresh subprocess so that its peak RSS is its own."""
    import subprocess

    rows: list[dict[str, Any]] = []
    for spec in (args.draft, args.target):
        for dtype in ("fp32", "bf16"):
            cmd = [
                sys.executable,
                "-m",
                "specfed.bench",
                "dtype-one",
                "--model",
                spec,
                "--dtype",
                dtype,
                "--prompts",
                args.prompts,
                "--threads",
                str(args.threads),
                "--max-new-tokens",
                str(args.max_new_tokens),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout))
            log(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}))
    same = {}
    for spec in (args.draft, args.target):
        by = {r["dtype"]: r["tokens"] for r in rows if r["model"] == spec}
        firsts = []
        for a, b in zip(by["fp32"], by["bf16"], strict=True):
            diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
            firsts.append(diff[0] if diff else None)
        same[spec] = {
            "identical_prompts": sum(f is None for f in firsts) / len(firsts),
            "first_divergence_positions": firsts,
        }
    for r in rows:
        r.pop("tokens")
    return {
        "benchmark": "dtype",
        "threads": args.threads,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "rows": rows,
        "greedy_fp32_vs_bf16": same,
    }


def loopback_copy_ms(n_bytes: int, reps: int = 20) -> float:
    """Median time to move n_bytes through a TCP connection on 127.0.0.1 (send + receive
    into a buffer, Python sockets): the floor for the network part of a round."""
    import socket
    import threading

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    payload = b"x" * n_bytes

    def sink() -> None:
        conn, _ = srv.accept()
        buf = bytearray(n_bytes)
        view = memoryview(buf)
        for _ in range(reps + 1):
            got = 0
            while got < n_bytes:
                got += conn.recv_into(view[got:], n_bytes - got)
            conn.sendall(b"k")
        conn.close()

    th = threading.Thread(target=sink, daemon=True)
    th.start()
    cli = socket.create_connection(("127.0.0.1", port))
    cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        cli.sendall(payload)
        cli.recv(1)
        if i:  # the first transfer warms the connection up
            times.append((time.perf_counter() - t0) * 1e3)
    cli.close()
    th.join()
    srv.close()
    return float(np.median(times))


def bench_loopback(args: argparse.Namespace) -> dict[str, Any]:
    """Two real worker processes on 127.0.0.1; per-round overhead of the network path."""
    import os
    import subprocess
    import tempfile

    from specfed.client import RemoteWorker
    from specfed.engine import FederatedGenerator
    from specfed.messages import Transmission
    from specfed.models import load_model
    from specfed.options import Mode

    torch.set_num_threads(args.threads)
    logdir = Path(tempfile.mkdtemp(prefix="specfed-bench-"))
    procs, addrs = [], []
    try:
        for i, spec in enumerate(args.workers.split(",")):
            log_fh = (logdir / f"w{i + 1}.log").open("w")
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "specfed.worker",
                    "--model",
                    spec,
                    "--listen",
                    "127.0.0.1:0",
                    "--threads",
                    str(args.threads),
                    "--dtype",
                    args.dtype,
                ],
                stdout=subprocess.PIPE,
                stderr=log_fh,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            if "ready on" not in line:
                raise RuntimeError(f"worker {spec} failed, see {logdir}")
            addrs.append(("127.0.0.1", int(line.split("ready on ")[1].split()[0].rsplit(":")[1])))
            log(line.strip())
        draft = load_model(args.draft, dtype=args.dtype)
        prompts = _prompt_ids(draft, args.prompts)
        clients = [RemoteWorker(f"w{i + 1}", a, draft) for i, a in enumerate(addrs)]
        modes = {"full": Transmission(Mode.FULL), "topk64": Transmission(Mode.TOPK, k=64)}
        out: dict[str, Any] = {}
        for label, tr in modes.items():
            gen = FederatedGenerator(
                draft,
                clients,
                gamma=args.gamma,
                temperature=1.0,
                transmissions=tr,
                parallel=True,
                measure_fidelity=False,
            )
            gen.generate(prompts[0][:8], 4, seed=99)  # warm-up, dropped
            rounds = [
                r
                for i, ids in enumerate(prompts)
                for r in gen.generate(ids, args.max_new_tokens, seed=i).rounds
            ]
            overhead = [
                r.t_round_ms - r.t_draft_ms - max(w.t_worker_ms for w in r.workers) for r in rounds
            ]
            agg = [r.t_aggregate_ms for r in rounds]
            net = [w.t_net_ms for r in rounds for w in r.workers]
            # where the overhead goes, on the critical path (the reply that arrived last)
            crit = [max(r.workers, key=lambda w: w.t_call_ms) for r in rounds]
            parts = {
                "send_request": [w.t_send_ms for w in crit],
                "network_and_worker_io": [w.t_net_ms - w.t_send_ms for w in crit],
                "worker_fidelity": [w.t_fidelity_ms for w in crit],
                "decode_and_check": [w.t_decode_ms for w in crit],
                "aggregate_and_accept": agg,
                # <= 0: the last reply's compute minus the longest compute of the round
                "compute_skew": [
                    c.t_worker_ms - max(w.t_worker_ms for w in r.workers)
                    for r, c in zip(rounds, crit, strict=True)
                ],
            }
            explained = np.sum([np.asarray(v) for v in parts.values()], axis=0)
            parts["other_scheduling"] = list(np.asarray(overhead) - explained)
            out[label] = {
                "rounds": len(rounds),
                "overhead_ms_median": float(np.median(overhead)),
                "overhead_ms_p90": float(np.percentile(overhead, 90)),
                "overhead_breakdown_ms_median": {
                    k: round(float(np.median(v)), 3) for k, v in parts.items()
                },
                "server_aggregate_ms_median": float(np.median(agg)),
                "t_net_ms_median": float(np.median(net)),
                "bytes_up_per_worker_round_median": float(
                    np.median([w.bytes_up for r in rounds for w in r.workers])
                ),
                "t_round_ms_median": float(np.median([r.t_round_ms for r in rounds])),
                "t_draft_ms_median": float(np.median([r.t_draft_ms for r in rounds])),
                "loopback_copy_ms_all_workers": loopback_copy_ms(
                    int(sum(w.bytes_up for w in rounds[0].workers))
                ),
            }
            log(f"{label}: {json.dumps(out[label])}")
        for c in clients:
            c.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
    return {
        "benchmark": "loopback",
        "workers": args.workers,
        "draft": args.draft,
        "dtype": args.dtype,
        "gamma": args.gamma,
        "threads_per_process": args.threads,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "modes": out,
        "note": "overhead = t_round - t_draft - max_i t_worker_i: framing, loopback "
        "transfer, decode, reconstruct, aggregate, accept, process scheduling",
    }


def _codecs_verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """Log the target's verdict per reconstruction; return the summary."""
    for m, t in summary["by_reconstruction"].items():
        for form, key in (("mean over T", "smallest"), ("at every T", "smallest_at_every_T")):
            best = t[key]
            log(
                f"target ({m}, {form}): "
                + (f"reached by {best['label']}, {best['bytes_per_position']:.1f} B" if best
                   else "NOT reached")
            )  # fmt: skip
    return summary


def bench_codecs(args: argparse.Namespace) -> dict[str, Any]:
    """Bytes against fidelity for every codec on recorded (or synthetic) distributions."""
    from specfed import codecbench as cb

    if args.from_json:  # summarize a previous run's rows again (target, curve, plot)
        out: dict[str, Any] = json.loads(args.from_json.read_text())
        ref_bytes = out["target"]["reference_entry_bytes_per_position"]
        out["target"] = _codecs_verdict(cb.target(out["rows"], ref_bytes))
        if args.plot:
            cb.plot_tradeoff(out["rows"], out["target"], args.plot)
            log(f"wrote {args.plot}")
        return out
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.source == "qwen":
        from specfed.study.record import default_cache_dir

        cache = None if args.no_cache else (args.cache or default_cache_dir())
        data = cb.qwen_logits(args.study, cache, args.prompts, args.positions, log)
    else:
        data = cb.synthetic_logits(args.prompts or 2, args.positions or 12, args.vocab, args.seed)
    t_data = time.perf_counter() - t0
    temperatures = [float(x) for x in args.temperatures.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    epsilons = [float(x) for x in args.epsilons.split(",")]
    grid = cb.codec_grid(ks, epsilons)
    log(
        f"{len(grid)} transmissions x {len(temperatures)} T on {data.n_positions} positions, "
        f"{len(data.workers)} workers, V = {data.vocab_size}"
    )
    t0 = time.perf_counter()
    rows = cb.evaluate_codecs(data, temperatures, grid, log)
    t_grid = time.perf_counter() - t0
    vocab = data.vocab_size
    reference_bytes = cb.REFERENCE_K * (index_bytes_for(vocab) + 2)  # K (ib + 2) for fp16
    summary = _codecs_verdict(cb.target(rows, reference_bytes))
    if args.plot:
        cb.plot_tradeoff(rows, summary, args.plot)
        log(f"wrote {args.plot}")
    return {
        "benchmark": "codecs",
        "data": data.info,
        "vocab_size": vocab,
        "positions": data.n_positions,
        "workers": data.workers,
        "weights": data.weights.tolist(),
        "temperatures": temperatures,
        "positions_per_message": cb.POSITIONS_PER_MESSAGE,
        "grid": {
            "ks": ks,
            "epsilons": epsilons,
            "value_dtypes": [d.value for d in cb.ValueDtype],
            "index_codings": [c.value for c in cb.IndexCoding],
            "transmissions": len(grid),
        },
        "threads": args.threads,
        "timing_s": {"data": t_data, "grid": t_grid},
        "target": summary,
        "rows": rows,
    }


@dataclass(frozen=True)
class ProfileGrid:
    """What `bench profile` times. Verify passes: at each cached context L, n = 1..gamma+1
    new tokens with n_positions in {1, n}, plus prefills of P tokens from an empty cache
    with gamma + 1 positions (a request's first round). Draft rounds: at each committed
    length L, n_sync in {1, 2} and gamma' in {1, gamma // 2, gamma}, plus prefills of P
    tokens. Every point is the median of `reps` timings (prefills: at most 3, they are the
    long ones), after a dropped warm-up."""

    gamma: int = 4
    contexts: tuple[int, ...] = (64, 256, 512, 1024)
    prefills: tuple[int, ...] = (32, 128, 512)
    reps: int = 5
    k: int = 64

    def verify_points(self) -> list[tuple[int, int]]:
        """(n_tokens, n_positions) timed at every context."""
        return [(n, p) for n in range(1, self.gamma + 2) for p in sorted({1, n})]

    def draft_points(self) -> list[tuple[int, int]]:
        """(n_sync, gamma') timed at every context."""
        gammas = sorted({1, max(1, self.gamma // 2), self.gamma})
        return [(n, g) for n in (1, 2) for g in gammas]

    @property
    def prefill_reps(self) -> int:
        return min(self.reps, 3)

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_reps": self.prefill_reps,
            "verify_n_tokens_n_positions": self.verify_points(),
            "draft_n_sync_gamma": self.draft_points(),
        }


QUICK_GRID = ProfileGrid(gamma=2, contexts=(16, 64), prefills=(16, 48), reps=2, k=16)


def _median_ms(fn: Callable[[], float], reps: int, spreads: list[float]) -> float:
    """Median of `reps` timings returned by fn (ms); the relative spread goes to `spreads`."""
    ts = [fn() for _ in range(reps)]
    med = float(np.median(ts))
    if med > 0:
        spreads.append((max(ts) - min(ts)) / med)
    return med


def measure_profile_samples(lm: Any, grid: ProfileGrid) -> tuple[list[Any], dict[str, Any]]:
    """Time real verify passes (LocalWorker.verify: Verifier + top-K encode, t_worker_ms)
    and real draft rounds (DraftProposer.propose, Draft.t_ms) of `lm` over `grid`.

    Returns (CostSamples, measurement info). Token ids are random (seeded): the cost of a
    pass does not depend on which tokens it holds."""
    from specfed.engine import LocalWorker
    from specfed.messages import Transmission, VerifyRequest
    from specfed.models import DraftProposer, KVSession
    from specfed.options import Mode
    from specfed.profile import CostSample

    g = grid.gamma
    limit = lm.max_context - g - 2
    contexts = sorted(c for c in grid.contexts if 2 < c <= limit)
    prefills = sorted(p for p in grid.prefills if g + 1 <= p <= limit)
    rng = np.random.default_rng(0)
    n_ids = lm.vocab_size if lm.tokenizer is None else min(lm.vocab_size, len(lm.tokenizer))
    ids = rng.integers(0, n_ids, size=max([*contexts, *prefills, 8]) + g + 2).tolist()
    worker = LocalWorker("profile", lm)
    tr = Transmission(Mode.TOPK, k=min(grid.k, lm.vocab_size))
    proposer = DraftProposer(lm)

    def verify(rid: str, start: int, n: int, n_pos: int) -> float:
        req = VerifyRequest(rid, start, ids[start : start + n], n_pos, 1.0, tr,
                            measure_fidelity=False)  # fmt: skip
        return float(worker.verify(req).t_worker_ms)

    def draft(rid: str, committed_len: int, n_sync: int, gamma: int) -> float:
        session = proposer.sessions.setdefault(rid, KVSession(lm))
        session.crop(min(committed_len - n_sync, len(session.tokens)))
        uniforms = rng.random(gamma)
        return float(proposer.propose(rid, ids[:committed_len], gamma, 1.0, uniforms).t_ms)

    samples: list[Any] = []
    spreads: list[float] = []
    t0 = time.perf_counter()
    for _ in range(3):  # warm-up, dropped
        verify("warm", 0, 8, 2)
        draft("warm", 8, 8, 2)
    worker.end("warm")
    proposer.end("warm")
    cur = 0
    for L in contexts:
        verify("v", cur, L - cur, 1)  # extend the cache to L tokens (not timed)
        for n, n_pos in grid.verify_points():
            t = _median_ms(partial(verify, "v", L, n, n_pos), grid.reps, spreads)
            samples.append(CostSample.verify(n, L + n, n_pos, t))
        cur = L
        proposer.propose("d", ids[:L], 1, 1.0, rng.random(1))  # the draft's cache to L
        for n_sync, gamma in grid.draft_points():
            t = _median_ms(partial(draft, "d", L, n_sync, gamma), grid.reps, spreads)
            samples.append(CostSample.draft(n_sync, L, gamma, t))
        log(f"profile: context {L} done ({time.perf_counter() - t0:.0f} s)")
    for P in prefills:
        t = _median_ms(partial(verify, "p", 0, P, g + 1), grid.prefill_reps, spreads)
        samples.append(CostSample.verify(P, P, g + 1, t))

        def fresh_draft(P: int = P) -> float:
            proposer.end("dp")
            return draft("dp", P, P, g)

        t = _median_ms(fresh_draft, grid.prefill_reps, spreads)
        samples.append(CostSample.draft(P, P, g, t))
        log(f"profile: prefill {P} done ({time.perf_counter() - t0:.0f} s)")
    for rid in ("v", "p"):
        worker.end(rid)
    for rid in ("d", "dp"):
        proposer.end(rid)
    info = {
        "grid": {**grid.describe(), "contexts": contexts, "prefills": prefills},
        "samples": len(samples),
        "seconds": time.perf_counter() - t0,
        "median_rep_spread": float(np.median(spreads)) if spreads else None,
        "verify_op": "engine.LocalWorker.verify (Verifier + top-K encode), t_worker_ms",
        "draft_op": "models.DraftProposer.propose, Draft.t_ms",
    }
    return samples, info


def _load_note() -> tuple[float, str]:
    """(1-minute load average, a sentence about it)."""
    import os

    load = os.getloadavg()[0]
    return load, f"1-min load average {load:.2f} on {os.cpu_count()} logical CPUs"


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _column_value(text: str) -> tuple[str, str]:
    col, eq, value = text.partition("=")
    if not (col and eq):
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    return col, value


def bench_profile(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Measure a device profile of one model on this machine (or fit one from a run)."""
    import os

    from specfed.profile import default_name, describe_device, make_provenance, save_profile

    command = ["python", "-m", "specfed.bench", *argv]
    if args.from_run is not None:
        try:
            profile = _profile_from_run(args, command)
        except (OSError, ValueError) as exc:  # ConfigError is a ValueError
            raise SystemExit(f"bench profile --from-run: {exc}") from exc
    else:
        from specfed.models import load_model
        from specfed.profile import DeviceProfile, fit_with_holdout

        if args.model is None:
            raise SystemExit("bench profile: give --model (or --from-run RUN_DIR --role R)")
        base = QUICK_GRID if args.quick else ProfileGrid()
        grid = ProfileGrid(
            gamma=args.gamma if args.gamma is not None else base.gamma,
            contexts=args.contexts or base.contexts,
            prefills=args.prefills or base.prefills,
            reps=args.reps or base.reps,
            k=args.k or base.k,
        )
        dtype = cast("Dtype", args.dtype or "bf16")
        threads = args.threads or 1
        torch.set_num_threads(threads)
        load_before, note_before = _load_note()
        cores = os.cpu_count() or 1
        if load_before > 0.25 * cores + 0.5:
            log(f"profile: WARNING the machine is busy ({note_before}); a profile for "
                "shipping must be measured on a quiet machine")  # fmt: skip
        lm = load_model(args.model, dtype=dtype)
        samples, measurement = measure_profile_samples(lm, grid)
        _, note_after = _load_note()
        cost, head, fit = fit_with_holdout(samples)
        fit["measurement"] = measurement
        fit["samples"] = [[s.kind, s.n_tokens, s.context, s.n, round(s.t_ms, 4)] for s in samples]
        fit["samples_columns"] = ["kind", "n_tokens", "context", "n_positions|gamma", "t_ms"]
        prov = make_provenance(
            command,
            notes=f"measured in one process; {note_before} at the start, "
            f"{note_after.split(' on ')[0]} at the end. {args.notes}".strip(),
        )
        profile = DeviceProfile(
            name=args.name or default_name(args.model, dtype, threads, prov.cores),
            device=args.device or describe_device(prov.cpu, prov.cores),
            model=args.model,
            dtype=dtype,
            threads=threads,
            vocab_size=lm.vocab_size,
            forward=cost,
            head_ms_per_position=head,
            fit=fit,
            provenance=prov,
        )
    out = args.out or Path("results") / "profiles" / f"{profile.name}.json"
    written = save_profile(profile, out)
    log(f"profile: wrote {written}")
    summary = {k: v for k, v in profile.fit.items() if k not in ("samples", "samples_columns")}
    return {
        "benchmark": "profile",
        "written": str(written),
        "name": profile.name,
        "model": profile.model,
        "dtype": profile.dtype,
        "threads": profile.threads,
        "coefficients_ms": profile.coefficients(),
        "fit": summary,
        "examples_ms": {
            "verify_5_tokens_at_context_256": profile.verify_ms(5, 256, 5),
            "draft_gamma_4_n_sync_1_at_context_256": profile.draft_ms(1, 256, 4),
        },
    }


def _run_models(run_dir: Path) -> dict[str, Any]:
    """models: {draft, workers, dtype, threads} of a run folder's scenario.yaml, or {}."""
    from specfed.config import load_yaml

    scenario = run_dir / "scenario.yaml"
    if not scenario.is_file():
        return {}
    models = load_yaml(scenario).get("models") or {}
    return models if isinstance(models, dict) else {}


def _profile_from_run(args: argparse.Namespace, command: list[str]) -> Any:
    """A profile fitted from RUN_DIR/rounds.csv (the run's own records)."""
    import os
    import socket

    import pandas as pd

    from specfed.models import peek_vocabulary
    from specfed.profile import Provenance, cpu_model, profile_from_rounds
    from specfed.provenance import git_state, versions

    run_dir = Path(args.from_run)
    if args.role is None:
        raise SystemExit("bench profile --from-run: give --role draft|<worker name>")
    rounds = pd.read_csv(run_dir / "rounds.csv")
    models = _run_models(run_dir)
    workers = models.get("workers") or {}
    model = args.model or (models.get("draft") if args.role == "draft" else workers.get(args.role))
    if not model:
        raise SystemExit(f"bench profile: {run_dir} does not name the model of role "
                         f"{args.role!r}; give --model")  # fmt: skip
    dtype = cast("Dtype", args.dtype or models.get("dtype") or "fp32")
    threads = args.threads or models.get("threads") or 1
    if "vocab_size" in rounds.columns and rounds["vocab_size"].notna().any():
        vocab_size = int(rounds["vocab_size"].dropna().iloc[0])
    else:
        peek = peek_vocabulary(model)
        if peek is None:
            raise SystemExit(f"bench profile: V of {model!r} unknown; prepare the model first")
        vocab_size = peek[0]
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    host = str(meta.get("host") or "unknown")
    prov = Provenance(
        command=" ".join(command),
        measured_utc=str(meta.get("started_utc") or "unknown"),
        host=host,
        cpu=cpu_model() if host == socket.gethostname() else "unknown (not in the run's meta)",
        cores=os.cpu_count() or 1,
        git=meta.get("git") or git_state(),
        versions=meta.get("versions") or versions(),
        notes=f"fitted from the records of run {run_dir} (role {args.role}): a LIVE run, "
        "whose processes shared the machine's cores; it describes that run's conditions, "
        f"not an idle device. {args.notes}".strip(),
    )
    filters = dict(args.where)
    return profile_from_rounds(
        rounds,
        args.role,
        model=str(model),
        dtype=dtype,
        threads=int(threads),
        vocab_size=vocab_size,
        provenance=prov,
        name=args.name,
        device=args.device,
        filters=filters,
    )


def _add_profile_parser(sub: Any) -> None:
    pr = sub.add_parser(
        "profile",
        help="measure a device profile of one model (or fit one from a run's records)",
        description="Times real verify passes and draft rounds of --model on this machine, "
        "fits the cost model of specfed.profile and writes the profile (default "
        "results/profiles/NAME.json). Measure on a quiet machine. With --from-run, fits "
        "the profile of one role from a run folder's rounds.csv instead (no model loaded).",
    )
    pr.add_argument("--model", help="bundle name, tiny-v<V>-s<seed>, or a folder")
    pr.add_argument("--dtype", choices=["fp32", "bf16"], help="weight dtype (default bf16)")
    pr.add_argument("--threads", type=int, help="torch threads (default 1)")
    pr.add_argument("--out", type=Path, help="the profile file to write")
    pr.add_argument("--name", help="profile name (default cpu<cores>-<model>-<dtype>-t<threads>)")
    pr.add_argument("--device", help="device description (default: cores, arch, CPU model)")
    pr.add_argument("--notes", default="", help="added to provenance.notes")
    pr.add_argument("--quick", action="store_true", help="a small grid (tests, CI)")
    pr.add_argument("--gamma", type=int, help="largest gamma of the grid (default 4)")
    pr.add_argument("--contexts", type=_int_list, help="cached contexts, e.g. 64,256,1024")
    pr.add_argument("--prefills", type=_int_list, help="prefill lengths, e.g. 32,128,512")
    pr.add_argument("--reps", type=int, help="timings per grid point (median; default 5)")
    pr.add_argument("--k", type=int, help="K of the top-K encode timed (default 64)")
    pr.add_argument("--from-run", type=Path, help="fit from RUN_DIR/rounds.csv instead")
    pr.add_argument("--role", help="with --from-run: draft or a worker name (w1, ...)")
    pr.add_argument(
        "--where",
        action="append",
        default=[],
        type=_column_value,
        metavar="COL=VALUE",
        help="with --from-run: keep only rounds with this column value (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m specfed.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    sub = ap.add_subparsers(dest="which", required=True)
    r = sub.add_parser("round", help="server cost per round, worker encode cost")
    r.add_argument("--reps", type=int, default=30)
    r.add_argument("--threads", type=int, default=1, help="torch threads (the server's share)")
    r.add_argument(
        "--compact-only", action="store_true", help="only the compact codecs at K = 64, N = 4"
    )
    for name in ("vs-hf", "dtype"):
        p = sub.add_parser(name)
        p.add_argument("--target", default="qwen2.5-coder-1.5b")
        p.add_argument("--draft", default="qwen2.5-coder-0.5b")
        p.add_argument("--prompts", default="humaneval[:4]")
        p.add_argument("--max-new-tokens", type=int, default=64 if name == "vs-hf" else 32)
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
        if name == "vs-hf":
            p.add_argument("--gamma", type=int, default=4)
            p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    one = sub.add_parser("dtype-one", help="(internal) one model at one dtype, for `dtype`")
    one.add_argument("--model", required=True)
    one.add_argument("--dtype", required=True, choices=["fp32", "bf16"])
    one.add_argument("--prompts", default="humaneval[:4]")
    one.add_argument("--max-new-tokens", type=int, default=32)
    one.add_argument("--threads", type=int, default=torch.get_num_threads())
    lb = sub.add_parser("loopback")
    lb.add_argument("--workers", default="qwen2.5-coder-1.5b,qwen2.5-coder-0.5b")
    lb.add_argument("--draft", default="qwen2.5-coder-0.5b")
    lb.add_argument("--prompts", default="humaneval[:2]")
    lb.add_argument("--max-new-tokens", type=int, default=32)
    lb.add_argument("--gamma", type=int, default=4)
    lb.add_argument("--threads", type=int, default=1, help="torch threads per process")
    lb.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    cb = sub.add_parser("codecs", help="bytes vs fidelity of every codec (issue 13)")
    cb.add_argument("--source", choices=["qwen", "synthetic"], default="qwen")
    cb.add_argument("--study", type=Path, default=Path("scenarios/paper_fig23.yaml"))
    cb.add_argument("--cache", type=Path, default=None, help="logits cache (study default)")
    cb.add_argument("--no-cache", action="store_true")
    cb.add_argument("--prompts", type=int, default=None, help="override prompts.count")
    cb.add_argument("--positions", type=int, default=None, help="override positions")
    cb.add_argument("--vocab", type=int, default=4000, help="synthetic: V")
    cb.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    cb.add_argument("--temperatures", default="0.8,1.0,1.2")
    cb.add_argument("--ks", default="16,64,128,256", help="K of top-K, and the caps of top-p")
    cb.add_argument("--epsilons", default="0.01,0.003,0.001", help="epsilon of top-p")
    cb.add_argument("--plot", type=Path, default=None, help="write the trade-off plot (PNG)")
    cb.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="summarize the rows of a previous run's JSON again (target, curve, plot)",
    )
    cb.add_argument("--threads", type=int, default=2)
    _add_profile_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    if args.which == "codecs":
        out = bench_codecs(args)
    elif args.which == "profile":
        out = bench_profile(args, argv)
    elif args.which == "loopback":
        out = bench_loopback(args)
    elif args.which == "dtype-one":
        out = _dtype_one(args)
    elif args.which == "round":
        out = bench_round(args.reps, args.threads, args.compact_only)
    elif args.which == "vs-hf":
        out = bench_vs_hf(args)
    else:
        out = bench_dtype(args)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
