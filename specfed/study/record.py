"""Step 1 of the study: record every model's logits along real generations (cached on disk).

For each prompt, ONE continuation is generated (federated speculative decoding with full fp32
transmission, so it is an exact sample from p at the generation temperature, or greedy; see
`generation.mode`), then every distinct model runs ONCE over prompt + continuation
(`KVSession.sync`) to give its logits at every generated position: l_i per worker and l_q for
the draft, [positions, V]. They are cached as one .npz per prompt (bf16 logits stored as their
raw 16-bit patterns, exactly), keyed by a hash of everything they depend on, so a rerun skips
the models.

Notation: p_i worker i's distribution, w_i its weight, p = sum_i w_i p_i, q the draft's, V the
vocabulary, x_1..x_n the generated tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specfed.config import ConfigError
from specfed.study.config import StudyConfig

__all__ = [
    "CACHE_FORMAT",
    "PromptLogits",
    "cache_file",
    "cache_key",
    "default_cache_dir",
    "load_record",
    "logits_to_numpy",
    "prompt_seed",
    "record_logits",
    "save_record",
]

CACHE_FORMAT = 1
"""Version of the logits cache files; part of every cache key."""


@dataclass
class PromptLogits:
    """One prompt's generated continuation and every model's logits along it.

    Attributes:
        prompt_id: e.g. "HumanEval/0".
        prompt_tokens: [L] int64, the prompt's token ids.
        tokens: [n] int64, the generated continuation x_1..x_n.
        logits: model name -> [n, V]; row j holds the logits after prompt + x_1..x_j, the
            distribution x_{j+1} is drawn from. float32, or uint16 (raw bf16 bit patterns,
            see `tensor`).
        text: the continuation decoded (for the record).
    """

    prompt_id: str
    prompt_tokens: np.ndarray
    tokens: np.ndarray
    logits: dict[str, np.ndarray]
    text: str = ""

    @property
    def n_positions(self) -> int:
        """n, the number of generated positions."""
        return len(self.tokens)

    def tensor(self, model: str) -> torch.Tensor:
        """Model's logits as a torch tensor [n, V] in their stored dtype (bf16 or fp32)."""
        arr = self.logits[model]
        if arr.dtype == np.uint16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


def logits_to_numpy(logits: torch.Tensor) -> np.ndarray:
    """[n, V] logits -> numpy, bf16 as exact uint16 bit patterns, anything else as float32."""
    logits = logits.detach().contiguous()
    if logits.dtype == torch.bfloat16:
        return logits.view(torch.int16).numpy().view(np.uint16).copy()
    return logits.float().numpy().copy()


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The generation seed of one prompt: stable whatever the prompt's place in the set."""
    return (seed ^ zlib.crc32(prompt_id.encode())) & 0x7FFFFFFF


def cache_key(cfg: StudyConfig, prompt_id: str, prompt_text: str) -> str:
    """Hash of everything the recorded logits of one prompt depend on (20 hex digits).

    The `study:` block (the grid) is not part of it: changing the grid never re-runs models.
    """
    spec = {
        "format": CACHE_FORMAT,
        "draft": cfg.draft,
        "workers": [cfg.workers[n] for n in cfg.workers],
        "weights": [cfg.weights[n] for n in cfg.workers],
        "dtype": cfg.dtype,
        "mode": cfg.generation_mode,
        "temperature": cfg.generation_temperature if cfg.generation_mode == "sampled" else 0,
        "gamma": cfg.gamma,
        "positions": cfg.positions,
        "seed": prompt_seed(cfg.seed, prompt_id),
        "prompt": hashlib.sha256(prompt_text.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def cache_file(cache: Path, cfg: StudyConfig, prompt_id: str, prompt_text: str) -> Path:
    """The cache file of one prompt: <cache>/<prompt id slug>-<cache_key>.npz."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt_id).strip("_") or "prompt"
    return cache / f"{slug}-{cache_key(cfg, prompt_id, prompt_text)}.npz"


def default_cache_dir() -> Path:
    """Where logits are cached by default: $SPECFED_CACHE/paper-fig23 (outside git)."""
    from specfed.bundle import cache_dir

    return cache_dir() / "paper-fig23"


def save_record(path: Path, rec: PromptLogits, models: Sequence[str]) -> None:
    """Write one prompt's record as .npz (atomically: a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, Any] = {
        "prompt_id": np.array(rec.prompt_id),
        "prompt_tokens": rec.prompt_tokens,
        "tokens": rec.tokens,
        "models": np.array(list(models)),
        "text": np.array(rec.text),
    }
    arrays.update({f"logits_{i}": rec.logits[m] for i, m in enumerate(models)})
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_record(path: Path) -> PromptLogits:
    """Read a record written by `save_record` (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        models = [str(m) for m in z["models"]]
        return PromptLogits(
            prompt_id=str(z["prompt_id"]),
            prompt_tokens=z["prompt_tokens"],
            tokens=z["tokens"],
            logits={m: z[f"logits_{i}"] for i, m in enumerate(models)},
            text=str(z["text"]),
        )


def record_logits(
    cfg: StudyConfig,
    cache: Path | None,
    log: Callable[[str], None] = print,
) -> tuple[list[PromptLogits], dict[str, Any]]:
    """The continuation and every model's logits for each prompt, from the cache or by
    running the models (each distinct model is loaded once; the draft and a worker that name
    the same model share it).

    Args:
        cfg: the study.
        cache: folder of cached .npz files (None: no cache, always run the models).
        log: progress lines.

    Returns:
        (records in prompt order, info: cache_dir, cache_hits, t_load_s, t_generate_s,
        t_logits_s (seconds), prompt_ids).

    Raises:
        ConfigError: the prompt source holds fewer prompts than `prompts.count`.
    """
    from specfed.prompts import load_prompts

    prompts = load_prompts(cfg.prompt_source)
    if len(prompts) < cfg.n_prompts:
        raise ConfigError(
            cfg.source,
            [
                (
                    "prompts.count",
                    f"{cfg.n_prompts} prompts asked, but {cfg.prompt_source!r} holds "
                    f"{len(prompts)}",
                )
            ],
        )
    prompts = prompts[: cfg.n_prompts]
    texts = [p.text if p.text is not None else repr(p.token_ids) for p in prompts]
    files = [
        cache_file(cache, cfg, p.id, t) if cache is not None else None
        for p, t in zip(prompts, texts, strict=True)
    ]
    records: list[PromptLogits | None] = [None] * len(prompts)
    for j, f in enumerate(files):
        if f is not None and f.is_file():
            try:
                records[j] = load_record(f)
            except (OSError, ValueError, KeyError) as exc:
                log(f"cache file {f} unreadable ({exc}); recomputing")
    hits = sum(r is not None for r in records)
    info: dict[str, Any] = {
        "cache_dir": str(cache) if cache is not None else None,
        "cache_hits": hits,
        "t_load_s": 0.0,
        "t_generate_s": 0.0,
        "t_logits_s": 0.0,
    }
    todo = [j for j, r in enumerate(records) if r is None]
    if todo:
        from specfed.engine import FederatedGenerator, LocalWorker
        from specfed.messages import Transmission
        from specfed.models import KVSession, LoadedModel, load_model
        from specfed.options import Mode

        t0 = time.perf_counter()
        lms: dict[str, LoadedModel] = {}
        for m in cfg.models:
            t = time.perf_counter()
            lms[m] = load_model(m, cfg.dtype)
            log(f"loaded {m} ({cfg.dtype}) in {time.perf_counter() - t:.1f} s")
        info["t_load_s"] = time.perf_counter() - t0
        draft = lms[cfg.draft]
        greedy = cfg.generation_mode == "greedy"
        gen = FederatedGenerator(
            draft if cfg.gamma > 0 else None,
            [LocalWorker(n, lms[m]) for n, m in cfg.workers.items()],
            weights=list(cfg.w),
            transmissions=Transmission(Mode.FULL),
            gamma=cfg.gamma,
            temperature=0.0 if greedy else cfg.generation_temperature,
            measure_fidelity=False,
        )
        for j in todo:
            p = prompts[j]
            ids = list(p.token_ids) if p.token_ids is not None else draft.encode(p.text or "")
            t = time.perf_counter()
            res = gen.generate(ids, cfg.positions, seed=prompt_seed(cfg.seed, p.id))
            t_gen = time.perf_counter() - t
            info["t_generate_s"] += t_gen
            n = len(res.tokens)
            if n == 0:
                raise RuntimeError(f"prompt {p.id}: the generation produced no token")
            if n < cfg.positions:
                log(f"prompt {p.id}: ended on EOS after {n} of {cfg.positions} positions")
            t = time.perf_counter()
            # Row j of the logits must be the distribution of x_{j+1}: feed prompt + x_1..x_{n-1}
            # and keep the logits after its last n tokens (prompt[-1], x_1, ..., x_{n-1}).
            seq = ids + res.tokens[:-1]
            logits = {m: logits_to_numpy(KVSession(lms[m]).sync(seq, n)) for m in cfg.models}
            t_log = time.perf_counter() - t
            info["t_logits_s"] += t_log
            rec = PromptLogits(
                prompt_id=p.id,
                prompt_tokens=np.asarray(ids, dtype=np.int64),
                tokens=np.asarray(res.tokens, dtype=np.int64),
                logits=logits,
                text=draft.decode(res.tokens),
            )
            f = files[j]
            if f is not None:
                save_record(f, rec, cfg.models)
            records[j] = rec
            log(
                f"[{j + 1}/{len(prompts)}] {p.id}: {n} positions, generation {t_gen:.1f} s, "
                f"{len(cfg.models)} logit passes {t_log:.1f} s"
            )
        del gen, lms
    info["prompt_ids"] = [p.id for p in prompts]
    out = [r for r in records if r is not None]
    for r in out:
        missing = [m for m in cfg.models if m not in r.logits]
        if missing:
            raise RuntimeError(f"prompt {r.prompt_id}: no logits for {missing}")
    return out, info
