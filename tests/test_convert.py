"""``convert = "f16"``: a registry model rewritten once by llama.cpp's quantizer.

The converted file must be a deterministic function of the source, load and
score correctly (checked against the brute-force reference, which shares no
code with the engine), stay close to the source's numbers, and go through the
same atomic, lock-protected path as a pull.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from reference import brute_logprobs

from cdr_local import models as M
from cdr_local.engine import EngineSettings, ScoreRequest
from cdr_local.engine.llama import LlamaModel, convert_gguf
from cdr_local.errors import ConfigError, ModelError


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _scores(path: Path) -> list[np.ndarray]:
    with LlamaModel(path, EngineSettings(n_ctx=256, n_batch=32, n_ubatch=32, n_threads=1)) as m:
        ctx = tuple(range(5, 45))
        conts = ((50, 51, 52), tuple(range(60, 120)))
        return m.loglikelihood([ScoreRequest((ctx,), conts)])[0]


def test_convert_is_deterministic_correct_and_close(tiny_bos_model: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert_gguf(tiny_bos_model, a, "f16", n_threads=1)
    convert_gguf(tiny_bos_model, b, "f16", n_threads=1)
    assert _sha(a) == _sha(b)
    assert a.stat().st_size < tiny_bos_model.stat().st_size  # f32 -> f16 weights
    got = _scores(a)
    ctx = list(range(5, 45))
    for g, cont in zip(got, ((50, 51, 52), tuple(range(60, 120))), strict=True):
        np.testing.assert_allclose(g, brute_logprobs(str(a), ctx, list(cont), n_threads=1), atol=1e-3, rtol=0)
    src = _scores(tiny_bos_model)
    for g, s in zip(got, src, strict=True):
        assert not np.array_equal(g, s)  # really another file ...
        np.testing.assert_allclose(g, s, atol=0.05, rtol=0)  # ... with nearly the same weights


def test_convert_bad_input(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="not a GGUF"):
        convert_gguf(junk, tmp_path / "out.gguf", "f16")
    with pytest.raises(ValueError, match="unknown weight type"):
        convert_gguf(junk, tmp_path / "out.gguf", "q3_weird")


def _registry(tmp_path: Path, model: Path, extra: str = "") -> M.Registry:
    reg = tmp_path / "r.toml"
    reg.write_text(f'[models.m]\npath = "{model}"\nconvert = "f16"\n{extra}\n')
    return M.load_registry(reg)


def test_registry_converts_once_into_the_cache(tiny_bos_model: Path, tmp_path: Path) -> None:
    spec = _registry(tmp_path, tiny_bos_model).model("m")
    assert spec.convert == "f16"
    final = M.model_path(spec)
    assert final.name.startswith("m-") and final.name.endswith(".f16.gguf")
    assert M.source_path(spec) == tiny_bos_model
    assert not M.is_present(spec)
    check = M.verify(spec)
    assert not check.ok and "not converted to f16 yet" in check.message
    # a leftover of a killed conversion never counts, and is cleaned up
    final.parent.mkdir(parents=True)
    leftover = final.with_name(final.name + ".part")
    leftover.write_bytes(b"GGUF half written")
    assert not M.is_present(spec)
    # resolve converts a present source even without pulling (no network needed)
    got = M.resolve(spec, pull=False)
    assert got == final and final.is_file() and not leftover.exists()
    assert M.verify(spec).ok and "runs as f16" in M.verify(spec).message
    mtime = final.stat().st_mtime_ns
    assert M.pull(spec) == final and final.stat().st_mtime_ns == mtime  # not redone
    ref = tmp_path / "ref.gguf"
    convert_gguf(tiny_bos_model, ref, "f16", n_threads=1)
    assert _sha(final) == _sha(ref)


def test_path_source_sha_is_checked_before_converting(tiny_bos_model: Path, tmp_path: Path) -> None:
    spec = _registry(tmp_path, tiny_bos_model, f'sha256 = "{"0" * 64}"').model("m")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        M.resolve(spec, pull=True)
    assert not M.model_path(spec).exists()
    good = _registry(tmp_path, tiny_bos_model, f'sha256 = "{_sha(tiny_bos_model)}"').model("m")
    assert M.resolve(good).name == f"m-{_sha(tiny_bos_model)[:12]}.f16.gguf"


def test_unknown_convert_type_is_a_config_error(tmp_path: Path) -> None:
    reg = tmp_path / "r.toml"
    reg.write_text('[models.m]\npath = "x.gguf"\nconvert = "q2"\n')
    with pytest.raises(ConfigError, match=r"models\.m\.convert.*one of f16, bf16, q8_0, f32"):
        M.load_registry(reg)


def test_recorded_sha_is_the_converted_files(tiny_bos_model: Path, tmp_path: Path) -> None:
    """Outputs record the digest of the file that runs; the source's is still checked."""
    from cdr_local.pair import model_sha256

    spec = _registry(tmp_path, tiny_bos_model, f'sha256 = "{_sha(tiny_bos_model)}"').model("m")
    path = M.resolve(spec)
    assert model_sha256(spec, path) == _sha(path) != _sha(tiny_bos_model)
    bad = _registry(tmp_path, tiny_bos_model, f'sha256 = "{"1" * 64}"').model("m")
    with pytest.raises(ModelError, match="sha256 mismatch"):
        model_sha256(bad, path)


def test_truncated_converted_file_fails_check(tiny_bos_model: Path, tmp_path: Path) -> None:
    spec = _registry(tmp_path, tiny_bos_model).model("m")
    path = M.resolve(spec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    check = M.verify(spec)
    assert not check.ok and "converted file" in check.message and "truncated" in check.message
