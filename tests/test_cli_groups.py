"""Options declared once: the engine options come from EngineSettings' fields, the
pair and Ray options from one group each, on every command that takes them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cdr_local.api import ENGINE_KEYS
from cdr_local.assembly import PairChoice
from cdr_local.cli import app
from cdr_local.cli.groups import PAIR, RAY, engine_options, uses
from cdr_local.engine import CLI_KEYS, EngineSettings
from cdr_local.models import Registry

ENGINE_FLAGS = {f.name: f.metadata["flags"] for f in dataclasses.fields(EngineSettings) if f.metadata.get("flags")}


def _command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def _flags(name: str) -> set[str]:
    return {o for p in _command(name).params for o in (*p.opts, *p.secondary_opts)}


def test_engine_options_are_the_fields_that_declare_flags() -> None:
    assert set(ENGINE_FLAGS) == {"n_ctx", "n_batch", "n_ubatch", "n_threads", "n_gpu_layers", "parallel_responses"}
    assert ENGINE_KEYS == CLI_KEYS == tuple(ENGINE_FLAGS)
    # models.toml's [engine] keys: the fields marked toml, with their canonical flag
    assert EngineSettings.FLAGS == {"n_ctx": "--n-ctx", "n_batch": "--n-batch", "n_ubatch": "--n-ubatch",
                                    "n_threads": "--threads", "n_gpu_layers": "--n-gpu-layers"}
    assert EngineSettings.RANGES["n_seq_max"] == (1, 256) and EngineSettings.RANGES["n_threads"] == (0, 512)
    names = [o.name for o in engine_options().options]
    assert names == [k for k in CLI_KEYS if k != "parallel_responses"]
    assert [o.name for o in engine_options(opt_in=True).options] == list(CLI_KEYS)


@pytest.mark.parametrize("command", ["annotate", "eval", "pairs", "score", "winrate", "synth"])
def test_every_scoring_command_has_every_engine_flag(command: str) -> None:
    flags = _flags(command)
    for name, opts in ENGINE_FLAGS.items():
        wanted = name != "parallel_responses" or command == "annotate"
        assert all((o in flags) == wanted for o in opts), (command, name)
    # and its help says what the field's metadata says
    helps = {p.name: p.help for p in _command(command).params}
    assert helps["n_ctx"] == dataclasses.fields(EngineSettings)[0].metadata["help"]


@pytest.mark.parametrize("command", ["annotate", "eval", "pairs", "score", "winrate"])
def test_pair_options_on_every_pair_command(command: str) -> None:
    assert {"--pair", "-p", "--strong", "--weak", "--strong-system", "--weak-system"} <= _flags(command)
    ray = {"--ray", "--ray-actors", "--ray-partition-size"}
    assert (ray <= _flags(command)) == (command in ("annotate", "eval", "pairs"))


def _probe() -> tuple[typer.Typer, list[dict[str, Any]]]:
    """A command built with the groups; it records what it was called with."""
    seen: list[dict[str, Any]] = []
    probe = typer.Typer()

    @probe.command()
    @uses(PAIR, engine_options(opt_in=True), RAY)
    def run(x: int = 1, *, pair: PairChoice, engine: dict[str, Any], ray: Any) -> None:
        seen.append({"x": x, "pair": pair, "engine": engine, "ray": ray})

    @probe.command()
    def other() -> None:  # two commands, so typer keeps command names
        pass

    return probe, seen


def test_groups_build_one_value_each() -> None:
    probe, seen = _probe()
    r = CliRunner().invoke(probe, ["run"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == {"x": 1, "pair": PairChoice(), "engine": dict.fromkeys(CLI_KEYS), "ray": None}
    r = CliRunner().invoke(probe, ["run", "--x", "3", "--strong", "a.gguf", "--weak", "b.gguf", "--weak-system", "W",
                                   "-t", "2", "--n-ctx", "512", "--parallel-responses", "--ray", "auto",
                                   "--ray-partition-size", "8"])
    assert r.exit_code == 0, r.output
    got = seen[-1]
    assert got["x"] == 3
    assert got["pair"] == PairChoice(None, "a.gguf", "b.gguf", None, "W")
    assert got["engine"] == {**dict.fromkeys(CLI_KEYS), "n_threads": 2, "n_ctx": 512, "parallel_responses": True}
    assert (got["ray"].address, got["ray"].partition_size, got["ray"].actors) == ("auto", 8, None)


def test_engine_values_reach_the_settings_with_the_flag_in_errors() -> None:
    """What a command does with ``engine``: models.toml's values, the flags over them, a bad flag named."""
    from cdr_local.assembly import engine_settings
    from cdr_local.errors import ConfigError

    reg = Registry(Path("models.toml"), models={}, pairs={}, default_pair="", engine=EngineSettings(n_ctx=1024, n_threads=3))
    probe, seen = _probe()
    assert CliRunner().invoke(probe, ["run", "--n-batch", "64"]).exit_code == 0
    s = engine_settings(reg, seen[-1]["engine"])
    assert (s.n_ctx, s.n_threads, s.n_batch, s.parallel_responses) == (1024, 3, 64, False)
    assert CliRunner().invoke(probe, ["run", "--threads", "99999"]).exit_code == 0
    with pytest.raises(ConfigError, match=r"^--threads must be between 0 and 512, got 99999$"):
        engine_settings(reg, seen[-1]["engine"])


def test_a_group_without_its_parameter_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="no parameter for option group"):
        @uses(RAY)
        def bad(x: int = 1) -> None: ...
