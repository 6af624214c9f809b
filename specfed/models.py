"""Causal LMs for SpecFed: loading, vocabulary fingerprints, KV-cached sessions, draft and verify.

Notation (Leviathan et al.): p is a target (worker) distribution, q the draft's, gamma the
number of drafted tokens per round, T the temperature, V the vocabulary size (the width of
the logits, which can exceed the tokenizer's token count). Every distribution returned here is
float32 on the CPU, shape [positions, V], rows summing to 1.

Temperature T = 0 means greedy decoding. Distributions are then computed at T = 1 (so that
top-K transmission and the mixture stay well defined) and the greedy choice (argmax) is made
by the sampler, which is equivalent to speculative sampling with one-hot p and q.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from specfed.sampling import sample_index

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelError(RuntimeError):
    """A model could not be loaded or used as asked; the message says which and why."""


@dataclass
class LoadedModel:
    """A causal LM ready for inference.

    Attributes:
        name: what the user asked for (bundle name, folder, .gguf file or hub id).
        model: the transformers model, in eval mode.
        tokenizer: its tokenizer (None only for bare test models).
        vocab_size: V, the width of the logits.
        fingerprint: sha256 over the sorted token -> id map (see `vocab_fingerprint`).
        eos_token_ids: token ids that end a generation.
    """

    name: str
    model: Any
    tokenizer: Any
    vocab_size: int
    fingerprint: str
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated tokens) the model accepts: its configured
        max_position_embeddings (a large default when the config does not say)."""
        n = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else 1 << 20

    @property
    def dtype(self) -> str:
        """Weight dtype name ("fp32" or "bf16")."""
        return {v: k for k, v in DTYPES.items()}.get(self.model.dtype, str(self.model.dtype))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if self.tokenizer is None:
            raise ModelError(f"model {self.name!r} has no tokenizer; pass token ids instead")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (a bare test model renders ids)."""
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def vocab_fingerprint(tokenizer: Any, vocab_size: int) -> str:
    """A short hash that identifies a vocabulary: sha256 of the sorted (token, id) pairs and V.

    Two models whose fingerprints differ cannot be mixed: their distributions index
    different tokens. The Qwen2.5-Coder 0.5B and 1.5B share one fingerprint.
    """
    h = hashlib.sha256()
    h.update(f"V={vocab_size};".encode())
    if tokenizer is not None:
        for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{idx}\t{token}\n".encode())
    return h.hexdigest()[:16]


class HasVocabulary(Protocol):
    """Anything that names a vocabulary: a LoadedModel, a worker client, a handshake."""

    name: str
    vocab_size: int
    fingerprint: str


def check_same_vocabulary(a: HasVocabulary, b: HasVocabulary) -> None:
    """Raise ModelError if `a` and `b` do not share one vocabulary (fingerprint and V)."""
    if a.fingerprint != b.fingerprint or a.vocab_size != b.vocab_size:
        raise ModelError(
            f"vocabulary mismatch: {_label(a)} (fingerprint {a.fingerprint}, V={a.vocab_size}) "
            f"and {_label(b)} (fingerprint {b.fingerprint}, V={b.vocab_size}) do not share a "
            "vocabulary; draft and workers must come from one tokenizer family"
        )


def _label(x: HasVocabulary) -> str:
    """'name' or 'name' (model 'm') for workers whose name is not their model's."""
    model = getattr(x, "model_name", x.name)
    return repr(x.name) if model == x.name else f"worker {x.name!r} (model {model!r})"


#: Names of tiny random-weight test models, built in memory from their seed: "tiny-v8192-s1"
#: has V = 8192 and seed 1. Deterministic, so processes that load one name get one model.
TINY_NAME = re.compile(r"tiny-v(?P<v>\d+)-s(?P<s>\d+)")


@functools.lru_cache(maxsize=64)
def peek_vocabulary(spec: str) -> tuple[int, str] | None:
    """(V, fingerprint) of the model `spec` names, from its tokenizer and config alone (no
    weights, nothing prepared or downloaded); None when it cannot be known without preparing
    the model (a bundle model not yet converted, a .gguf file).

    Raises ModelError when `spec` names no model: an unknown name, a missing path, or a hub
    id (runs are offline: models come from the bundle or a local folder).
    """
    from specfed.bundle import BundleError, classify_model_spec

    if tiny := TINY_NAME.fullmatch(spec):
        v = int(tiny["v"])
        return v, vocab_fingerprint(_TinyVocab(v), v)
    try:
        source = classify_model_spec(spec)
    except BundleError as exc:
        raise ModelError(str(exc)) from exc
    if source.kind == "hub":
        raise ModelError(
            f"{spec!r} is not a bundle name or a local path (a hub id would need a model hub, "
            "which runs do not reach: prepare it as a local folder with config.json)"
        )
    if source.path is None:
        return None
    try:
        config = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the tokenizer of {spec!r} at {source.path}: {exc}") from exc
    v = int(config.get("vocab_size") or len(tokenizer))
    return v, vocab_fingerprint(tokenizer, v)


class _TinyVocab:
    """The vocabulary of `make_tiny_model`'s tokenizer ("t0".."t{V-1}"), for fingerprints."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.vocab_size)}


def load_model(spec: str, dtype: str = "fp32") -> LoadedModel:
    """Load a causal LM from a bundle name, a local HF folder, a .gguf file or a hub id
    (or a tiny test model by name, see TINY_NAME).

    Bundle names and .gguf files are converted once into a plain HF folder in the cache
    (see specfed.bundle); hub ids need network access and are meant for users who are online.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specfed.bundle import resolve_model_path

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} for model {spec!r}; use one of {list(DTYPES)}")
    if tiny := TINY_NAME.fullmatch(spec):
        lm = make_tiny_model(vocab_size=int(tiny["v"]), seed=int(tiny["s"]))
        lm.model.to(DTYPES[dtype])
        lm.name = spec
        return lm
    source = resolve_model_path(spec)
    where = str(source.path) if source.path is not None else spec
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as exc:
        raise ModelError(f"cannot load model {spec!r} from {where}: {exc}") from exc
    return wrap_model(spec, model.eval(), tokenizer)


def wrap_model(name: str, model: Any, tokenizer: Any) -> LoadedModel:
    """Wrap an already loaded transformers model (used by load_model and by tests)."""
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    eos: set[int] = set()
    for cfg in (model.config, getattr(model, "generation_config", None)):
        ids = getattr(cfg, "eos_token_id", None)
        if isinstance(ids, int):
            eos.add(ids)
        elif ids:
            eos.update(int(i) for i in ids)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        fingerprint=vocab_fingerprint(tokenizer, vocab_size),
        eos_token_ids=frozenset(eos),
    )


def probabilities(logits: torch.Tensor, temperature: float) -> np.ndarray:
    """softmax(logits / T) as float32 numpy; T = 0 (greedy) uses T = 1.

    The softmax runs in float64 and is rounded once to float32: a float32 softmax over
    |V| = 151,936 leaves row sums off by up to ~7e-5, as large as the top-K bias at
    K/|V| = 10 %; this way rows sum to 1 within ~1e-8 (+0.9 ms per 5 rows here).

    Args:
        logits: [positions, V] in any float dtype.
    Returns:
        [positions, V] float32, rows sum to 1.
    """
    t = temperature if temperature > 0 else 1.0
    return torch.softmax(logits.double() / t, dim=-1).float().numpy()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class KVSession:
    """One model's KV cache for one request: the tokens it has processed and their cache.

    `forward(start, tokens)` crops the cache back to `start` tokens (the committed prefix)
    and runs ONE forward pass over `tokens`, returning the logits of the last positions.
    """

    def __init__(self, lm: LoadedModel) -> None:
        from transformers import DynamicCache

        self.lm = lm
        self.tokens: list[int] = []
        self._cache = DynamicCache(config=lm.model.config)

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens."""
        if not 0 <= length <= len(self.tokens):
            raise ModelError(
                f"cannot crop the {self.lm.name!r} session to {length} tokens: it holds "
                f"{len(self.tokens)}"
            )
        if length < len(self.tokens):
            self._cache.crop(length - len(self.tokens))
            del self.tokens[length:]

    @torch.inference_mode()
    def forward(self, start: int, tokens: Sequence[int], n_logits: int) -> torch.Tensor:
        """Crop to `start`, append `tokens` in one forward pass, return [n_logits, V] logits.

        The returned rows are the logits at the last `n_logits` input positions, i.e. the
        next-token distributions after each of the last `n_logits` tokens.
        """
        if not tokens:
            raise ModelError("forward needs at least one new token")
        if not 1 <= n_logits <= len(tokens):
            raise ModelError(f"n_logits={n_logits} must be in [1, {len(tokens)}]")
        self.crop(start)
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        out = self.lm.model(
            input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=n_logits
        )
        self.tokens.extend(int(t) for t in tokens)
        return out.logits[0]

    def sync(self, sequence: Sequence[int], n_logits: int = 1) -> torch.Tensor:
        """Make the session hold exactly `sequence`, reusing the longest common prefix.

        Returns the logits [n_logits, V] after the last `n_logits` tokens of `sequence`. At
        least max(1, n_logits) tokens are (re)fed so that their logits exist.
        """
        start = min(common_prefix(self.tokens, sequence), len(sequence) - max(1, n_logits))
        return self.forward(start, sequence[start:], n_logits)


@dataclass
class Draft:
    """gamma drafted tokens and the draft distributions they were sampled from.

    Attributes:
        tokens: x_1..x_gamma.
        q: [gamma, V] float32, q^(j) the distribution x_j was drawn from (at temperature T).
        t_ms: wall time of drafting.
    """

    tokens: list[int]
    q: np.ndarray
    t_ms: float
    n_sync: int = 0
    """tokens the first forward pass processed (those committed since the cache's prefix)"""
    t_emulated_ms: float = math.nan
    """replay: the drafting time the device profile gives (NaN when drafting for real)"""
    t_recorded_ms: float = math.nan
    """replay: the drafting time measured when the trace was recorded"""


class DraftProposer:
    """The server's draft model: proposes gamma tokens autoregressively from q.

    One KVSession per request; `propose` syncs it to the committed sequence (reusing the
    cache) and runs gamma single-token steps.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.name = lm.name
        self.vocab_size = lm.vocab_size
        self.fingerprint = lm.fingerprint
        self.eos_token_ids = lm.eos_token_ids
        self.sessions: dict[str, KVSession] = {}

    def propose(
        self,
        request_id: str,
        committed: Sequence[int],
        gamma: int,
        temperature: float,
        uniforms: np.ndarray,
    ) -> Draft:
        """Draft gamma tokens after `committed`, using uniforms[j] to sample x_{j+1}."""
        import time

        t0 = time.perf_counter()
        session = self.sessions.setdefault(request_id, KVSession(self.lm))
        tokens: list[int] = []
        qs: list[np.ndarray] = []
        n_sync = 0
        if gamma > 0:
            n_sync = len(committed) - min(
                common_prefix(session.tokens, committed), len(committed) - 1
            )
            logits = session.sync(list(committed), 1)
            for j in range(gamma):
                q = probabilities(logits, temperature)[0]
                x = int(q.argmax()) if temperature == 0 else sample_index(q, float(uniforms[j]))
                tokens.append(x)
                qs.append(q)
                if j + 1 < gamma:
                    logits = session.forward(len(session.tokens), [x], 1)
        q_all = np.stack(qs) if qs else np.zeros((0, self.lm.vocab_size), np.float32)
        return Draft(tokens, q_all, (time.perf_counter() - t0) * 1e3, n_sync)

    def end(self, request_id: str) -> None:
        """Free the request's KV cache."""
        self.sessions.pop(request_id, None)


class Verifier:
    """A worker's target model: one forward pass over the new tokens -> gamma + 1 distributions.

    The server tells the worker where the committed prefix ends (`start`) and sends the
    tokens after it; the worker crops its cache there (dropping rejected drafts) and runs
    one pass. One KVSession per request id.
    """

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.sessions: dict[str, KVSession] = {}

    def verify(
        self,
        request_id: str,
        start: int,
        tokens: Sequence[int],
        n_positions: int,
        temperature: float,
    ) -> np.ndarray:
        """Return p^(1..n_positions) as [n_positions, V] float32 (n_positions = gamma + 1)."""
        session = self.sessions.setdefault(request_id, KVSession(self.lm))
        return probabilities(session.forward(start, tokens, n_positions), temperature)

    def end(self, request_id: str) -> None:
        """Free the request's KV cache."""
        self.sessions.pop(request_id, None)


# --- tiny random-weight models for tests and CI smoke runs ------------------------------


def make_tiny_model(
    path: str | os.PathLike[str] | None = None,
    vocab_size: int = 16,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    logit_scale: float = 1.0,
    max_position_embeddings: int = 4096,
) -> LoadedModel:
    """Build a small random-weight Qwen2-architecture LM with a word-level tokenizer.

    The tokenizer maps tokens "t0".."t{V-1}" to ids 0..V-1, so two tiny models with the same
    vocab_size share a fingerprint. `logit_scale` is about the std of the logits: larger
    sharpens, smaller flattens the output distributions; `max_position_embeddings` is the
    model's context. If `path` is given the model is saved there as a plain HF folder,
    loadable by `load_model(path)` (the worker processes of the loopback and Mininet tests
    use this).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, logit_scale / hidden_size**0.5)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")
    name = f"tiny-v{vocab_size}-s{seed}"
    if path is not None:
        out = Path(path)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "specfed-tiny.json").write_text(
            json.dumps({"vocab_size": vocab_size, "seed": seed, "hidden_size": hidden_size})
        )
        name = str(out)
    return wrap_model(name, model, tokenizer)
