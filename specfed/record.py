"""Record points into traces: the federated generation run once in process (no network).

    python -m specfed.record --draft qwen2.5-coder-0.5b \\
        --workers w1=qwen2.5-coder-1.5b,w2=qwen2.5-coder-0.5b --weights 0.5,0.5 \\
        --points-file points.json --prompts "humaneval[:2]" --max-new-tokens 32 --seed 1234 \\
        --dtype bf16 --threads 1 [--cache DIR] [--json]

For every point of the points file (specfed.points), the trace that point needs is looked up
in the cache by its key (everything it depends on: models and their identities, dtype,
threads, weights, prompts, seeds, lengths, the point's options, versions of the numerics);
only the missing ones are recorded. Recording uses the same FederatedGenerator, seeds and
codecs as a live run, with the workers in this process. Workers that run the same model share
one model and one computation per request content. Prints one line per point (or, with
--json, a JSON object {point: trace path}); exit 0 ok, 1 recording failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specfed.config import ConfigError
from specfed.engine import FederatedGenerator, LocalWorker, RoundRecord, local_l1
from specfed.messages import VerifyReply, VerifyRequest
from specfed.models import Draft, DraftProposer, LoadedModel, ModelError, load_model
from specfed.options import check_weights
from specfed.points import Point, read_points
from specfed.prompts import Prompt, PromptError, load_prompts
from specfed.provenance import git_state, versions
from specfed.trace import (
    TRACE_FORMAT,
    TraceWriter,
    draft_key,
    q_bytes,
    reply_info,
    request_content,
    score_bytes,
    score_key,
    trace_dir,
    trace_key,
    verify_key,
)

__all__ = [
    "RecordSpec",
    "main",
    "model_identity",
    "record_points",
    "refuse_timing_dependent",
    "trace_path",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class RecordSpec:
    """What the traces of a set of points depend on besides the points themselves."""

    draft: str
    workers: dict[str, str]
    weights: list[float] | None
    prompts: str
    max_new_tokens: int
    seed: int
    dtype: str = "bf16"
    threads: int = 1
    measure_fidelity: bool = True
    score: bool = True

    def depends_on(self, point: Point) -> dict[str, Any]:
        """Everything a point's trace depends on (hashed into its key)."""
        models = sorted({self.draft, *self.workers.values()})
        return {
            "format": TRACE_FORMAT,
            "draft": self.draft,
            "workers": dict(self.workers),
            "weights": self.weights,
            "identities": {m: model_identity(m) for m in models},
            "dtype": self.dtype,
            "threads": self.threads,
            "prompts": self.prompts,
            "prompts_identity": prompts_identity(self.prompts),
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "measure_fidelity": self.measure_fidelity,
            "score": self.score,
            "point": point.content(),
            "numerics": versions(("torch", "transformers", "numpy")),
        }


def model_identity(spec: str) -> str:
    """What identifies a model's weights: the pinned sha256 of a bundle model, the name of a
    tiny test model (built from its seed), or a hash of a folder's config and weight files
    (names, sizes, modification times)."""
    from specfed.bundle import REGISTRY
    from specfed.models import TINY_NAME

    if TINY_NAME.fullmatch(spec):
        return spec
    if spec in REGISTRY:
        return f"bundle:{REGISTRY[spec].sha256}"
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        h = hashlib.sha256(config.read_bytes() if config.exists() else b"")
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return f"folder:{h.hexdigest()[:16]}"
    if path.is_file():
        st = path.stat()
        return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"spec:{spec}"


def prompts_identity(spec: str) -> str:
    """The prompt spec, plus the content hash when it names a file."""
    path = Path(spec)
    if spec.endswith(".jsonl") and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return spec


def trace_path(spec: RecordSpec, point: Point, cache: Path | None = None) -> Path:
    """Where the trace of `point` lives (it may not exist yet)."""
    return (cache or trace_dir()) / f"{trace_key(spec.depends_on(point))}.zip"


# ----------------------------------------------------------------------------- recording


class _ModelGroup:
    """One model shared by every worker that runs it: one verifier, one computation per
    request content (the workers of a round send identical content)."""

    def __init__(self, lm: LoadedModel, writer_ref: list[TraceWriter]) -> None:
        self.lm = lm
        self.worker = LocalWorker(lm.name, lm)
        self.writer_ref = writer_ref
        self.cached: tuple[tuple[Any, ...], np.ndarray, float] | None = None
        self.scores: dict[str, np.ndarray] = {}

    def probabilities(self, request: VerifyRequest, content: list[int]) -> tuple[np.ndarray, float]:
        """p [P, V] for this request content (computed once per content), and the compute
        time in ms (forward pass + softmax) measured when it was computed."""
        key = (tuple(content), request.n_positions, request.temperature)
        if self.cached is not None and self.cached[0] == key:
            return self.cached[1], self.cached[2]
        t0 = time.perf_counter()
        p = self.worker.verifier.verify(
            request.request_id, request.start, request.tokens, request.n_positions,
            request.temperature,
        )  # fmt: skip
        t_ms = (time.perf_counter() - t0) * 1e3
        self.cached = (key, p, t_ms)
        return p, t_ms


class RecordingWorker:
    """An in-process worker that records every reply it gives into the trace."""

    def __init__(self, name: str, group: _ModelGroup) -> None:
        self.name = name
        self.group = group
        self.model_name = group.lm.name
        self.vocab_size = group.lm.vocab_size
        self.fingerprint = group.lm.fingerprint
        self.held: dict[str, list[int]] = {}

    def verify(self, request: VerifyRequest) -> VerifyReply:
        content = request_content(request, self.held.get(request.request_id, []))
        self.held[request.request_id] = content
        p, t_forward_ms = self.group.probabilities(request, content)
        t0 = time.perf_counter()
        payload = request.transmission.codec().encode(p)
        t_worker_ms = t_forward_ms + (time.perf_counter() - t0) * 1e3
        l1 = math.nan
        t1 = time.perf_counter()
        if request.measure_fidelity:
            from specfed.codecs import decode_any

            l1 = local_l1(p, decode_any(payload), request.reconstruction)
        reply = VerifyReply(
            payload, t_worker_ms, l1, request_id=request.request_id, round=request.round,
            t_fidelity_ms=(time.perf_counter() - t1) * 1e3,
            bytes_up=len(payload), bytes_down=4 * len(request.tokens),
        )  # fmt: skip
        key = verify_key(
            content, request.n_positions, request.temperature, request.transmission,
            request.reconstruction, request.measure_fidelity,
        )  # fmt: skip
        self.group.writer_ref[0].add(
            f"reply/{self.model_name}/{key}", payload, {**reply_info(reply), "round": request.round}
        )
        return reply

    def score(self, sequence: Sequence[int], n_context: int, temperature: float) -> np.ndarray:
        key = score_key(sequence, n_context, temperature)
        if key not in self.group.scores:
            self.group.scores[key] = self.group.worker.score(sequence, n_context, temperature)
        probs = self.group.scores[key]
        self.group.writer_ref[0].add(f"score/{self.model_name}/{key}", score_bytes(probs), {})
        return probs

    def end(self, request_id: str) -> None:
        self.held.pop(request_id, None)
        self.group.worker.end(request_id)
        self.group.cached = None


class RecordingProposer(DraftProposer):
    """The draft model, recording every draft into the trace (with the round it served)."""

    def __init__(self, lm: LoadedModel, writer_ref: list[TraceWriter]) -> None:
        super().__init__(lm)
        self.writer_ref = writer_ref
        self.keys: dict[str, list[str]] = {}

    def propose(
        self,
        request_id: str,
        committed: Sequence[int],
        gamma: int,
        temperature: float,
        uniforms: np.ndarray,
    ) -> Draft:
        draft = super().propose(request_id, committed, gamma, temperature, uniforms)
        key = draft_key(committed, gamma, temperature)
        self.writer_ref[0].add(
            f"draft/{key}",
            q_bytes(draft.q),
            {"tokens": draft.tokens, "n_sync": draft.n_sync, "t_ms": draft.t_ms, "gamma": gamma},
        )
        self.keys.setdefault(request_id, []).append(f"draft/{key}")
        return draft


def refuse_timing_dependent(points: Sequence[Point]) -> None:
    """ConfigError naming every point whose policies depend on when replies arrive (cost
    gamma, K from observed throughput, quorum / deadline aggregation): a recording in
    process has no network, so its decisions would not be the ones a replay makes."""
    problems = [
        (f"point {p.point} ({p.label}): {where}", f"{why}; run it live (compute.mode: live)")
        for p in points
        for where, why in p.timing_dependent()
    ]
    if problems:
        raise ConfigError("points (record/replay)", problems)


def _load(spec: str, dtype: str, cache: dict[str, LoadedModel], log: Log) -> LoadedModel:
    if spec not in cache:
        t0 = time.perf_counter()
        cache[spec] = load_model(spec, dtype=dtype)
        log(f"loaded {spec} ({dtype}) in {time.perf_counter() - t0:.1f} s")
    return cache[spec]


def record_points(
    spec: RecordSpec,
    points: Sequence[Point],
    cache: Path | None = None,
    log: Log = lambda _msg: None,
) -> list[Path]:
    """The trace of every point, recording those missing from the cache. Returns the paths
    in the order of `points`. ConfigError if a point's policies depend on timing (they
    cannot be recorded in process: `refuse_timing_dependent`)."""
    import torch

    refuse_timing_dependent(points)
    torch.set_num_threads(spec.threads)
    paths = [trace_path(spec, p, cache) for p in points]
    missing = [(p, path) for p, path in zip(points, paths, strict=True) if not path.exists()]
    if not missing:
        return paths
    models: dict[str, LoadedModel] = {}
    draft_lm = _load(spec.draft, spec.dtype, models, log)
    prompts = load_prompts(spec.prompts)
    ids = [list(p.token_ids) if p.token_ids else draft_lm.encode(p.text or "") for p in prompts]
    for point, path in missing:
        t0 = time.perf_counter()
        size = _record_one(spec, point, path, models, draft_lm, prompts, ids, log)
        log(f"recorded {point.label} in {time.perf_counter() - t0:.1f} s: {path} ({size:,} bytes)")
    return paths


def _record_one(
    spec: RecordSpec,
    point: Point,
    path: Path,
    models: dict[str, LoadedModel],
    draft_lm: LoadedModel,
    prompts: Sequence[Prompt],
    ids: Sequence[list[int]],
    log: Log,
) -> int:
    writer_ref: list[TraceWriter] = []
    groups = {
        m: _ModelGroup(_load(m, spec.dtype, models, log), writer_ref)
        for m in dict.fromkeys(spec.workers.values())
    }
    workers = [RecordingWorker(name, groups[m]) for name, m in spec.workers.items()]
    proposer = RecordingProposer(draft_lm, writer_ref)
    gen = FederatedGenerator.for_point(
        point, proposer, workers, spec.weights, measure_fidelity=spec.measure_fidelity
    )
    requests: list[dict[str, Any]] = []
    streams = {
        m: {"vocab_size": g.lm.vocab_size, "fingerprint": g.lm.fingerprint,
            "max_context": g.lm.max_context}
        for m, g in groups.items()
    }  # fmt: skip
    meta: dict[str, Any] = {
        "format": TRACE_FORMAT,
        "key": path.stem,
        "depends_on": spec.depends_on(point),
        "point": point.content(),
        "vocab": {
            "draft": spec.draft,
            "vocab_size": draft_lm.vocab_size,
            "fingerprint": draft_lm.fingerprint,
            "eos_token_ids": sorted(draft_lm.eos_token_ids),
        },
        "streams": streams,
        "workers": dict(spec.workers),
        "requests": requests,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_state(),
        "versions": versions(),
    }
    writer = TraceWriter(path, meta)
    writer_ref.append(writer)
    for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
        rid = f"record-{i}"
        rounds: list[RoundRecord] = []
        res = gen.generate(prompt_ids, spec.max_new_tokens, seed=spec.seed + i, request_id=rid,
                           on_round=rounds.append)  # fmt: skip
        drafted = [r for r in rounds if r.n_drafted]
        for key, r in zip(proposer.keys.pop(rid, []), drafted, strict=True):
            writer.index[key]["emitted"] = r.emitted
        t_worker: dict[str, float] = {}
        for r in rounds:
            for w in r.workers:
                t_worker[w.worker] = t_worker.get(w.worker, 0.0) + w.t_worker_ms
        requests.append(
            {
                "index": i,
                "prompt_id": prompt.id,
                "seed": spec.seed + i,
                "prompt_ids": prompt_ids,
                "tokens": res.tokens,
                "rounds": [r.emitted for r in rounds],
                "logp_mean": gen.score(prompt_ids, res.tokens) if spec.score else None,
                "t_draft_ms": sum(r.t_draft_ms for r in rounds),
                "t_worker_ms": t_worker,
            }
        )
        log(f"  {point.label} prompt {prompt.id}: {len(res.tokens)} tokens, {len(rounds)} rounds")
    meta["bytes"] = dict(writer.bytes_by_kind)
    meta["bytes_per_request"] = {
        k: v / max(1, len(requests)) for k, v in writer.bytes_by_kind.items()
    }
    return writer.close()


# ----------------------------------------------------------------------------- CLI


def _workers(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        name, sep, model = item.partition("=")
        if not sep or not name or not model:
            raise ValueError(f"--workers entry {item!r} must look like NAME=MODEL")
        out[name.strip()] = model.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    from specfed.provenance import add_version

    ap = argparse.ArgumentParser(
        prog="python -m specfed.record",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(ap)
    ap.add_argument("--draft", required=True, help="draft model (as for specfed.server)")
    ap.add_argument("--workers", required=True, help="NAME=MODEL[,NAME=MODEL...]")
    ap.add_argument("--weights", default=None, help="w_i, comma-separated, sum 1")
    ap.add_argument("--points-file", type=Path, required=True, help="points (specfed.points)")
    ap.add_argument("--prompts", default="humaneval[:4]")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-fidelity", action="store_true", help="as specfed.server --no-fidelity")
    ap.add_argument("--no-score", action="store_true", help="as specfed.server --no-score")
    ap.add_argument("--cache", type=Path, default=None, help="trace cache (default: "
                    "$SPECFED_CACHE/traces)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print {point: trace path} as JSON")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        workers = _workers(args.workers)
        weights = (
            check_weights([float(x) for x in args.weights.split(",")], len(workers))
            if args.weights
            else None
        )
        points = read_points(args.points_file)
        refuse_timing_dependent(points)
        load_prompts(args.prompts)
    except (ValueError, ConfigError, PromptError) as exc:
        print(f"specfed.record: {exc}", file=sys.stderr)
        return 2
    spec = RecordSpec(
        args.draft, workers, weights, args.prompts, args.max_new_tokens, args.seed, args.dtype,
        args.threads, not args.no_fidelity, not args.no_score,
    )  # fmt: skip

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"specfed.record: {msg}", file=sys.stderr, flush=True)

    try:
        paths = record_points(spec, points, args.cache, log)
    except (ModelError, OSError) as exc:
        print(f"specfed.record: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({str(p.point): str(path) for p, path in zip(points, paths, strict=True)}))
    else:
        for p, path in zip(points, paths, strict=True):
            print(f"{p.label}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
