"""Options shared by several commands, declared once (typer ``Annotated`` types).

The pair, engine and Ray options are grouped in ``cli/groups.py``; the engine
options are generated there from ``EngineSettings``' fields."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelsOpt = Annotated[
    Path | None,
    typer.Option("--models", envvar="CDR_MODELS", help="A registry (TOML) merged over the shipped models.toml and the "
                 "user's (~/.config/cdr-local/models.toml, or $CDR_HOME/models.toml): its models and pairs add to "
                 "theirs or replace those of the same name."),
]
PairOpt = Annotated[str | None, typer.Option("--pair", "-p", help="Pair name from the registry. Default: its default_pair.")]
_SRC = ("a GGUF path, a registry model name, or a Hugging Face file: org/repo:QUANT (the repo's one .gguf with QUANT "
        "in its name, as llama.cpp's -hf) or org/repo/file.gguf (needs the hub extra; used in place in the Hugging Face cache)")
StrongOpt = Annotated[str | None, typer.Option("--strong", metavar="SRC", help=f"Strong model, with --weak instead of --pair: {_SRC}.")]
WeakOpt = Annotated[str | None, typer.Option("--weak", metavar="SRC", help="Weak model, with --strong (same forms).")]
StrongSystemOpt = Annotated[str | None, typer.Option("--strong-system", metavar="TEXT", help="System prompt of the --strong side.")]
WeakSystemOpt = Annotated[str | None, typer.Option("--weak-system", metavar="TEXT", help="System prompt of the --weak side.")]


NoPullOpt = Annotated[bool, typer.Option("--no-pull", help="Fail instead of fetching missing registry models.")]


ProfileOpt = Annotated[
    str,
    typer.Option("--profile", help="Customization profile: a shipped name (none, cdr, cdr-fewshot, cdr-paper: see cdr profiles list), $CDR_HOME/profiles/NAME.toml, or a path."),
]
RouterOpt = Annotated[
    str | None,
    typer.Option("--router", help="Domain router: model (the strong model's likeliest domain name), answer (the strong model answers [START]DOMAIN[END] greedily, else the default domain: the CDR authors' router), keywords, or none. Default: answer for a profile with its own router prompt (cdr-paper), model when the profile has several domains."),
]

RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[ADDRESS]",
        help="Score on a Ray cluster (needs the ray extra): ADDRESS is the head's HOST:PORT, ray://HOST:PORT, "
        "'auto' (the cluster this machine has joined) or 'local' (a new private one); --ray alone: $RAY_ADDRESS, "
        "else a cluster started on this machine, else a new local one.  The output is the same as a local run's.",
    ),
]
RayActorsOpt = Annotated[
    int | None,
    typer.Option("--ray-actors", help="Ray actors (each loads the pair once). Default: one per node, or one per GPU with --n-gpu-layers."),
]
RayPartitionOpt = Annotated[
    int,
    typer.Option("--ray-partition-size", help="Input lines per Ray partition (the unit of work, of part files and of --resume)."),
]


MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        help="Scoring method, or several comma-separated (the first labels, the others are measured alongside, so "
        "eval reports them side by side): cdr (the density ratio, with --rule), strong (the strong model's "
        "log-likelihood alone), judge (the strong model reads both responses and scores the verdict A vs B, both "
        "orders averaged; N responses cost N(N-1) reads). Default: cdr.",
    ),
]
RuleOpt = Annotated[
    str | None,
    typer.Option(
        "--rule",
        help="Scoring rule that labels (NAME or NAME:key=value): cdr-sum, cdr-mean, cdr-offset, cdr-lc, cdr-beta, "
        "cdr-beta-mean, strong-sum, strong-mean, weak-sum, weak-mean, longer, shorter. Default: the pair's calibration's rule, else cdr-sum.",
    ),
]
CalibrationOpt = Annotated[
    Path | None,
    typer.Option("--calibration", help="Calibration JSON (from cdr eval --calibrate). Default: the one shipped for the pair, if any."),
]
MinConfidenceOpt = Annotated[
    float | None,
    typer.Option("--min-confidence", metavar="P", help="Keep only records whose confidence (P(label right)) is at least P; "
                 "the others go to OUT.abstained.jsonl (whole lines), counted in the summary."),
]
KeepTopOpt = Annotated[
    float | None,
    typer.Option("--keep-top", metavar="Q", help="Keep the most confident share Q of records (0 < Q <= 1): the threshold is the "
                 "calibration sample's, fixed before the run; the others go to OUT.abstained.jsonl."),
]


# the run: input, resume, rejects, display (the pipeline's options)
InputArg = Annotated[
    str,
    typer.Argument(
        help="Input JSONL ('-' for stdin): {prompt, chosen, rejected}, {prompt, response_a, response_b}, "
        "{prompt, responses: [...]}, or TRL conversational records."
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run: skip ids already in the output.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start again, replacing an existing output.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Resume even if settings that change scores differ from the first run.")]
RejectsOpt = Annotated[str | None, typer.Option("--rejects", help="Where rejected lines go (default OUT.rejects.jsonl; '-' = stderr).")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Score at most this many new records.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")]
PlainOpt = Annotated[bool, typer.Option("--plain", help="Plain log lines instead of the progress bar.")]
