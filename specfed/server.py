"""The SpecFed server: holds the draft model and drives requests through remote workers.

    python -m specfed.server --draft qwen2.5-coder-0.5b --workers 10.0.0.2:7100,10.0.0.3:7100 \\
        --transmission full,topk --k 16,64 --reconstruction renormalize,draft-guided \\
        --gamma 4 --temperature 1.0 --prompts "humaneval[:4]" --max-new-tokens 32 --out results/x

Transmission, K, reconstruction, gamma, temperature and the policies (--gamma-policy, --k auto,
--aggregation; specfed.policies) are per-request options: give several (comma-separated) and
the server runs every combination ("points") against the same worker processes, without
reloading any model. Each request of a point uses seed + prompt index, so
points differ only in what they vary (coupled seeds).

Writes to --out, appending as it goes (a crash keeps everything before it):
    rounds.csv     one row per (request, round, worker): bytes, times in ms, acceptance, eps
    requests.csv   one row per request: latency (ms), tokens, acceptance, bytes per token
    events.jsonl   worker losses and failures
    server.json    the command line and versions
and prints a summary table. Exit status: 0 ok, 1 a request failed, 2 bad arguments/setup.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from specfed import wire
from specfed.client import RemoteWorker
from specfed.engine import FederatedGenerator, GenerationResult, RoundRecord, WorkerLost
from specfed.models import HasVocabulary, ModelError, common_prefix, load_model
from specfed.options import (
    IndexCoding,
    LossPolicy,
    Mode,
    Reconstruction,
    ValueDtype,
    check_weights,
)
from specfed.points import Point, points_from_lists, read_points
from specfed.prompts import Prompt, PromptError, load_prompts
from specfed.provenance import git_state, versions
from specfed.records import (
    REQUEST_COLUMNS,
    ROUND_COLUMNS,
    EventLog,
    RecordsError,
    Table,
    summary_table,
)
from specfed.trace import TraceMismatch
from specfed.wire import parse_addr, read_token

log = logging.getLogger("specfed.server")

KEEP_WARM_MS = 5.0
"""Replay: while a round waits for its replies, re-run the last reply's decode and
aggregation every this many ms (engine.FederatedGenerator keep_warm_ms). On this project's
2-core machine, replaying emubench scale's N = 2 group on 127.0.0.1 (14 top-64 rounds, the
host busy with another run), the server's part of a round after the last reply fell from
2.0 to 1.3 ms median with it."""


def _list(text: str, conv: Any, what: str) -> list[Any]:
    try:
        return [conv(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{what}: cannot parse {text!r} ({exc})") from exc


def _k_value(text: str) -> int | str:
    """A --k entry: an integer, or auto (link-aware K per worker)."""
    return "auto" if text == "auto" else int(text)


def _aggregation(text: str) -> dict[str, Any]:
    """An --aggregation entry: all, quorum:M or deadline:D (ms)."""
    rule, _, value = text.partition(":")
    if rule == "all" and not value:
        return {}
    if rule == "quorum" and value:
        return {"quorum": int(value)}
    if rule == "deadline" and value:
        return {"deadline_ms": float(value)}
    raise ValueError(f"unknown aggregation {text!r} (all, quorum:M or deadline:D_MS)")


def points_from_args(args: argparse.Namespace) -> list[Point]:
    """The points to run: the --points-file, or the cross product of the comma-separated
    options (full transmission ignores K and reconstruction). ConfigError/ValueError if bad."""
    if args.points_file:
        return read_points(args.points_file)
    modes = [
        Mode.parse(m, "--transmission") for m in _list(args.transmission, str, "--transmission")
    ]
    ks = _list(args.k, _k_value, "--k") if args.k else []
    if any(m != Mode.FULL for m in modes) and not ks:
        raise ValueError("--k is needed for topk (K) and adaptive (cap on K)")
    options = {
        "mode": modes,
        "gamma": _list(args.gamma, int, "--gamma"),
        "temperature": _list(args.temperature, float, "--temperature"),
        "k": ks or [None],
        "reconstruction": [
            Reconstruction.parse(r, "--reconstruction")
            for r in _list(args.reconstruction, str, "--reconstruction")
        ],
        "gamma_policy": _list(args.gamma_policy, str, "--gamma-policy"),
        "aggregation": _list(args.aggregation, _aggregation, "--aggregation"),
    }
    fixed = {
        "epsilon": args.epsilon,
        "value_dtype": args.value_dtype,
        "index_coding": args.index_coding,
        "gamma_min": args.gamma_min,
        "gamma_max": args.gamma_max,
        "k_budget_ms": args.k_budget_ms,
        "k_min": args.k_min,
        "k_max": args.k_max,
        "k_source": args.k_source,
    }
    points = points_from_lists(options, fixed)
    return [
        Point.model_validate(
            {**p.model_dump(), "point": p.point + args.point_offset, "rep": args.rep}
        )
        for p in points
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m specfed.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    ap.add_argument(
        "--draft",
        required=True,
        help="draft model: bundle name, HF folder, .gguf, "
        "hub id (its tokenizer also encodes the prompts)",
    )
    ap.add_argument("--workers", required=True, help="HOST:PORT[,HOST:PORT...] of the workers")
    ap.add_argument("--worker-names", default=None, help="names for the records (default w1..wN)")
    ap.add_argument("--weights", default=None, help="w_i, comma-separated, sum 1 (default equal)")
    ap.add_argument(
        "--transmission",
        default="full",
        help=f"{'|'.join(Mode.names())}, comma-separated",
    )
    ap.add_argument(
        "--k",
        default=None,
        help="K for topk / cap for adaptive, comma-separated; auto = link-aware K per worker "
        "and round (topk; see --k-budget-ms)",
    )
    ap.add_argument(
        "--epsilon",
        type=float,
        default=0.01,
        help="adaptive: keep the smallest K with mass >= 1 - epsilon",
    )
    ap.add_argument(
        "--value-dtype",
        default="fp32",
        choices=ValueDtype.names(),
        help="probability values on the wire: fp32, fp16, or (top-K only) q8 / q4 "
        "log-probabilities quantized per position (docs/codecs.md)",
    )
    ap.add_argument(
        "--index-coding",
        default=IndexCoding.FIXED.value,
        choices=IndexCoding.names(),
        help="how top-K indices are written: fixed width, bit-packed, or sorted and "
        "delta-coded (varint or bit-packed); ignored by full transmission",
    )
    ap.add_argument(
        "--reconstruction",
        default="renormalize",
        help=f"{'|'.join(Reconstruction.names())}, comma-separated",
    )
    ap.add_argument(
        "--gamma",
        default="4",
        help="drafted tokens per round, comma-separated (0 = federated autoregressive baseline)",
    )
    ap.add_argument("--temperature", default="1.0", help="T, comma-separated (0 = greedy)")
    ap.add_argument(
        "--gamma-policy",
        default="fixed",
        help="fixed|heuristic|cost, comma-separated: gamma per round fixed, +2/-1 from the "
        "acceptance history (HF assisted generation), or minimizing the expected ms/token "
        "from the measured round costs (specfed.policies)",
    )
    ap.add_argument("--gamma-min", type=int, default=1, help="adaptive gamma: the smallest")
    ap.add_argument(
        "--gamma-max", type=int, default=None, help="adaptive gamma: the largest (max(16, gamma))"
    )
    ap.add_argument(
        "--k-budget-ms",
        type=float,
        default=None,
        help="--k auto: the upload budget per reply, ms of serialization on the worker's link",
    )
    ap.add_argument("--k-min", type=int, default=1, help="--k auto: the smallest K")
    ap.add_argument("--k-max", type=int, default=1024, help="--k auto: the largest K")
    ap.add_argument(
        "--k-source",
        default="link",
        choices=["link", "observed"],
        help="--k auto: K from the link estimate at the start only (the points file's "
        "k_auto.links; none = unlimited), or then from the goodput of the worker's replies",
    )
    ap.add_argument(
        "--aggregation",
        default="all",
        help="all|quorum:M|deadline:D_MS, comma-separated: when a round's replies are enough",
    )
    ap.add_argument(
        "--prompts",
        default="humaneval[:4]",
        help="humaneval[a:b], FILE.jsonl, ids:1,2,3 or a literal prompt",
    )
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="request i of every point uses seed + i")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="draft weights")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the draft")
    ap.add_argument("--out", type=Path, required=True, help="folder for the tables")
    ap.add_argument(
        "--info-file",
        default="server.json",
        help="name of the file in --out that records the command line, points and versions "
        "(one per server process; the testbed gives each group its own)",
    )
    ap.add_argument("--run-id", default=None, help="run id column (default: random)")
    ap.add_argument("--rep", type=int, default=0, help="repetition number column")
    ap.add_argument("--point-offset", type=int, default=0, help="added to the point column")
    ap.add_argument(
        "--points-file",
        type=Path,
        default=None,
        help="JSON list of points (specfed.points.Point: gamma, temperature, transmission "
        "{mode, k, epsilon, value_dtype, index_bytes}, reconstruction, point, rep), run in "
        "that order; replaces the comma-separated per-request options above",
    )
    ap.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constant column added to every row (e.g. link parameters); repeatable",
    )
    ap.add_argument(
        "--on-worker-loss",
        default=LossPolicy.FAIL.value,
        choices=[p.value for p in LossPolicy],
        help="fail: end the run with an error naming the worker; continue: drop "
        "it, renormalize the weights over the rest and go on",
    )
    ap.add_argument(
        "--warmup-tokens",
        type=int,
        default=0,
        metavar="N",
        help="live: before the first request, one unrecorded warm-up request of N tokens on "
        "the first prompt (it pays the processes' first-call costs; logged as an event), "
        "so every prompt of every point is measured warm; 0: none, and the first request "
        "is flagged warmup instead",
    )
    ap.add_argument(
        "--no-fidelity",
        action="store_true",
        help="workers skip measuring ||p_i - p_hat_i||_1 (saves O(V) per position)",
    )
    ap.add_argument(
        "--no-score",
        action="store_true",
        help="skip the per-request fidelity score (logp_mean: mean log-probability per "
        "token under the exact ensemble, one extra forward pass per worker after the request)",
    )
    ap.add_argument("--connect-timeout", type=float, default=10.0, help="s")
    ap.add_argument("--read-timeout", type=float, default=120.0, help="s, per socket read")
    ap.add_argument("--round-timeout", type=float, default=300.0, help="s, per worker round")
    ap.add_argument("--max-frame", type=int, default=wire.DEFAULT_MAX_FRAME, help="bytes")
    ap.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="file holding the shared secret of workers started with --auth-token-file",
    )
    ap.add_argument(
        "--replay",
        type=Path,
        action="append",
        default=[],
        metavar="TRACE",
        help="replay mode: draft from these traces (repeatable; one per point, made by "
        "python -m specfed.record) instead of running the draft model; the workers must "
        "replay the same traces. Prompts come from the traces",
    )
    ap.add_argument(
        "--compute",
        default="recorded",
        help="replay: the emulated drafting time: 'recorded' or a device profile (name/file)",
    )
    ap.add_argument(
        "--speed", type=float, default=1.0, help="replay: divide the emulated drafting time by this"
    )
    ap.add_argument("--quiet", action="store_true", help="no per-request progress lines")
    return ap.parse_args(argv)


def _tags(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _setup(
    args: argparse.Namespace,
) -> tuple[
    list[Point], dict[str, str], list[tuple[str, int]], list[str], list[float] | None, list[Prompt]
]:
    """Everything the command line says, checked before any model loads or worker connects.

    Raises ConfigError / ValueError / PromptError (usage errors: exit 2)."""
    points = points_from_args(args)
    tags = _tags(args.tag)
    addrs = [parse_addr(a, "--workers entry") for a in args.workers.split(",")]
    names = (
        args.worker_names.split(",")
        if args.worker_names
        else [f"w{i + 1}" for i in range(len(addrs))]
    )
    if len(names) != len(addrs):
        raise ValueError(f"{len(names)} --worker-names for {len(addrs)} workers")
    weights = (
        check_weights(_list(args.weights, float, "--weights"), len(addrs)) if args.weights else None
    )
    for what in ("connect_timeout", "read_timeout", "round_timeout"):
        value = getattr(args, what)
        if not (math.isfinite(value) and 0 < value <= 7 * 24 * 3600):
            raise ValueError(f"--{what.replace('_', '-')}: must be in (0, 604800] s, got {value}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.warmup_tokens < 0:
        raise ValueError(f"--warmup-tokens: must be >= 0, got {args.warmup_tokens}")
    for p in points:
        q = p.aggregation.quorum
        if q is not None and q > len(addrs):
            raise ValueError(f"point {p.label}: quorum {q} exceeds the {len(addrs)} workers")
        unknown = sorted(set(p.k_auto.links) - set(names)) if p.k_auto else []
        if unknown:
            raise ValueError(
                f"point {p.label}: link estimates for unknown workers {unknown} "
                f"(the workers are {', '.join(names)})"
            )
    prompts = load_prompts(args.prompts)
    args.token = read_token(args.auth_token_file) if args.auth_token_file else ""
    return points, tags, addrs, names, weights, prompts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        points, tags, addrs, names, weights, prompts = _setup(args)
    except (ValueError, PromptError) as exc:  # ConfigError is a ValueError
        print(f"specfed.server: {exc}", file=sys.stderr)
        return 2
    try:
        drafter = _Replay(args.replay, points, args) if args.replay else _Live(args, prompts)
    except (ValueError, RuntimeError, OSError) as exc:  # ModelError, TraceError
        print(f"specfed.server: {exc}", file=sys.stderr)
        return 2
    try:
        workers = [
            RemoteWorker(
                n,
                a,
                drafter.vocab,
                args.connect_timeout,
                args.read_timeout,
                args.round_timeout,
                args.max_frame,
                token=args.token,
            )
            for n, a in zip(names, addrs, strict=True)
        ]
    except (ModelError, WorkerLost, OSError) as exc:
        print(f"specfed.server: {exc}", file=sys.stderr)
        return 2
    run_id = args.run_id or uuid.uuid4().hex[:8]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.info_file).write_text(
        json.dumps(
            {
                "argv": sys.argv if argv is None else argv,
                "run_id": run_id,
                "points": [p.model_dump(mode="json") for p in points],
                "versions": versions(),
                "git": git_state(),
                "workers": {w.name: w.model_name for w in workers},
                "draft": {
                    "name": args.draft,
                    "vocab_size": drafter.vocab.vocab_size,
                    "fingerprint": drafter.vocab.fingerprint,
                    "dtype": args.dtype,
                },
                "compute": drafter.describe(),
            },
            indent=2,
        )
    )
    try:
        rounds_t = Table(args.out / "rounds.csv", ROUND_COLUMNS, tags)
        requests_t = Table(args.out / "requests.csv", REQUEST_COLUMNS, tags)
    except RecordsError as exc:
        print(f"specfed.server: {exc}", file=sys.stderr)
        return 2
    events = EventLog(args.out / "events.jsonl")
    print(
        f"specfed.server ready: {len(workers)} workers, {len(points)} points x "
        f"{len(prompts)} prompts, run {run_id}, compute {drafter.mode}",
        flush=True,
    )

    status = 0
    results: list[dict[str, Any]] = []
    first_request = True
    for pi, point in enumerate(points):
        try:
            gen = FederatedGenerator.for_point(
                point,
                drafter.proposer(point),
                workers,
                weights,
                measure_fidelity=not args.no_fidelity,
                parallel=True,
                on_worker_loss=args.on_worker_loss,
                keep_warm_ms=KEEP_WARM_MS if drafter.mode == "replay" else None,
            )
        except ValueError as exc:  # a policy that does not fit these workers
            print(f"specfed.server: point {point.label}: {exc}", file=sys.stderr)
            status = 2
            break
        keys = {
            "run_id": run_id,
            **point.columns(),
            "vocab_size": gen.vocab_size,
            "compute_mode": drafter.mode,
            "index_bytes": point.transmission.wire_index_bytes(gen.vocab_size),  # as sent
        }
        for i, (prompt_id, ids) in enumerate(drafter.prompts(point)):
            rid = f"{run_id}-p{point.point}r{point.rep}-{i}"
            # The first request of a set of worker processes pays their warm-up (allocator,
            # caches, lazy init): flagged, so analysis can leave it out. Replayed processes
            # run no model: their first request is like the others (measured within 0.1 %).
            if first_request and drafter.mode == "live" and args.warmup_tokens > 0:
                _warm_up(gen, ids, args, f"{run_id}-warmup", events)
                first_request = False
            warmup = first_request and drafter.mode == "live"
            req_keys = {**keys, "request_id": rid, "prompt_id": prompt_id, "warmup": warmup}
            first_request = False

            def on_round(r: RoundRecord, req_keys: dict[str, Any] = req_keys) -> None:
                base = {k: v for k, v in r.__dict__.items() if k not in ("workers", "emitted")}
                for w in r.workers:
                    rounds_t.append({**req_keys, **base, **w.__dict__})
                drafter.check_round(str(req_keys["request_id"]), r)

            t0 = time.perf_counter()
            try:
                res = gen.generate(
                    ids, args.max_new_tokens, seed=args.seed + i, request_id=rid, on_round=on_round
                )
                drafter.check_request(point, i, rid, res.tokens)
            except (WorkerLost, TraceMismatch) as exc:
                msg = str(exc)
                events.write(
                    {
                        "request_id": rid,
                        "event": "failed",
                        "error": msg,
                        "t_s": time.perf_counter() - t0,
                    }
                )
                requests_t.append(
                    {**req_keys, "seed": args.seed + i, "status": "error", "events": msg}
                )
                print(f"specfed.server: request {rid} failed: {msg}", file=sys.stderr)
                status = 1
                break
            row = _request_row(res, req_keys, args.seed + i)
            if not args.no_score:  # after the request: neither timed nor counted as traffic
                row["logp_mean"] = gen.score(ids, res.tokens)
            requests_t.append(row)
            results.append({**row, "label": point.label})
            for ev in res.events:
                events.write({"request_id": rid, "event": ev})
                print(f"specfed.server: {rid}: {ev}", file=sys.stderr)
            if not args.quiet:
                print(
                    f"[{pi + 1}/{len(points)}] {point.label} {prompt_id}: "
                    f"{row['new_tokens']} tokens, {row['ms_per_token']:.1f} ms/token, "
                    f"acceptance {row['acceptance']:.2f}",
                    flush=True,
                )
        gen.close()
        if status:
            break
    for w in workers:
        w.close()
    rounds_t.close()
    requests_t.close()
    events.close()
    if results:
        _print_summary(results)
    print(f"records: {args.out}")
    return status


def _warm_up(
    gen: FederatedGenerator, ids: list[int], args: argparse.Namespace, rid: str, events: EventLog
) -> None:
    """One request that is not recorded (only an event with its time): the first call of
    every process pays allocator, cache and lazy-init costs the others do not."""
    t0 = time.perf_counter()
    res = gen.generate(ids, args.warmup_tokens, seed=args.seed, request_id=rid)
    ms = (time.perf_counter() - t0) * 1e3
    events.write({"request_id": rid, "event": "warmup", "tokens": len(res.tokens), "ms": ms})


class _Live:
    """Drafting for real: the draft model loaded here; prompts encoded by its tokenizer."""

    mode = "live"

    def __init__(self, args: argparse.Namespace, prompts: list[Prompt]) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.draft = load_model(args.draft, dtype=args.dtype)
        self.vocab: HasVocabulary = self.draft
        self._prompts = [
            (p.id, list(p.token_ids) if p.token_ids else self.draft.encode(p.text or ""))
            for p in prompts
        ]

    def prompts(self, point: Point) -> list[tuple[str, list[int]]]:
        return self._prompts

    def proposer(self, point: Point) -> Any:
        return self.draft if point.gamma > 0 else None

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode}

    def check_round(self, request_id: str, record: RoundRecord) -> None:
        return None

    def check_request(self, point: Point, index: int, request_id: str, tokens: list[int]) -> None:
        return None


class _Replay:
    """Drafting replayed from traces (specfed.replay): no model loaded; each point's prompts
    and recorded tokens come from its trace, and every round's emitted tokens are checked."""

    mode = "replay"

    def __init__(self, paths: list[Path], points: list[Point], args: argparse.Namespace) -> None:
        from specfed.replay import ReplayProposer, compute_times, precise_timers
        from specfed.trace import TraceError, TraceSet

        precise_timers()  # the emulated drafting waits wake on time (before any thread starts)
        self.traces = TraceSet.open(paths)
        self.by_point: dict[int, Any] = {}
        for p in points:
            timing = p.timing_dependent()
            if timing:
                raise TraceError(
                    f"point {p.label} cannot be replayed: "
                    + "; ".join(f"{where}: {why}" for where, why in timing)
                    + " (run it live)"
                )
            want = p.content()
            match = [t for t in self.traces.traces if t.meta.get("point") == want]
            if not match:
                raise TraceError(
                    f"no trace given for point {p.label} (the --replay traces hold "
                    + ", ".join(
                        Point.model_validate(t.meta["point"]).label for t in self.traces.traces
                    )
                    + ")"
                )
            self.by_point[p.point] = match[0]
        self.times = compute_times(args.compute, args.speed)
        # One proposer per point: a draft is looked up in its own point's trace only (the
        # same draft serves every point, but what its round emits differs between points).
        self.proposers = {
            i: ReplayProposer(TraceSet([t]), self.times) for i, t in self.by_point.items()
        }
        self.current: Any = None
        self.vocab: HasVocabulary = next(iter(self.proposers.values()))

    def proposer(self, point: Point) -> Any:
        self.current = self.proposers[point.point] if point.gamma > 0 else None
        return self.current

    def prompts(self, point: Point) -> list[tuple[str, list[int]]]:
        return [
            (str(r["prompt_id"]), list(r["prompt_ids"]))
            for r in self.by_point[point.point].meta["requests"]
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "draft_compute": self.times.label,
            "draft_speed": self.times.speed,
            "traces": [str(t.path) for t in self.traces.traces],
        }

    def check_round(self, request_id: str, record: RoundRecord) -> None:
        if self.current is not None:
            self.current.check_round(request_id, record.emitted)

    def check_request(self, point: Point, index: int, request_id: str, tokens: list[int]) -> None:
        recorded = self.by_point[point.point].meta["requests"][index]["tokens"]
        if list(tokens) != list(recorded):
            first = common_prefix(tokens, recorded)
            raise TraceMismatch(
                f"request {request_id}: emitted {len(tokens)} tokens that differ from the "
                f"{len(recorded)} recorded (first difference at token {first})"
            )


def _request_row(res: GenerationResult, keys: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        **keys,
        **res.summary(),
        "seed": seed,
        "status": "ok",
        "events": "; ".join(res.events),
        "tokens": res.tokens,
    }


def _print_summary(results: list[dict[str, Any]]) -> None:
    print(summary_table(pd.DataFrame(results), ["label"]))


if __name__ == "__main__":
    raise SystemExit(main())
