"""The Python API: what the CLI does, as functions.

    import cdr_local

    with cdr_local.Annotator(pair="smollm2-sys") as a:          # load the pair once
        rec = a.score("What is 2+2?", ["4.", "5, probably."])   # annotate's output record
        rec["label"], rec["confidence"], rec["scores"][0]["value"]

    cdr_local.score("What is 2+2?", ["4.", "5."], strong="a.gguf", weak="b.gguf")
    cdr_local.annotate_file("in.jsonl", "out.jsonl", resume=True)     # streaming, resumable: the CLI's run
    rep = cdr_local.evaluate_file("dev.jsonl", "eval.jsonl", per_section=100)  # the report dict

(``annotate_file``/``evaluate_file``, not ``annotate``/``evaluate``: those names are
the package's task modules.)

Every function takes the CLI's options as keyword arguments with the CLI's
defaults (``pair``, ``strong``/``weak``, ``models``, ``profile``, ``router``,
``rule``, ``method``, ``calibration``, engine settings such as ``n_threads`` and ``n_ctx``,
...), and fails with the CLI's one-line errors (``cdr_local.errors.CdrError``).
The CLI commands ``annotate``, ``eval`` and ``score`` run through the same code
(``runs.run_scoring``, ``runs.eval_report``, :class:`Annotator`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .assembly import PairChoice
from .engine import CLI_KEYS

if TYPE_CHECKING:
    from .annotate import AnnotateTask
    from .pipeline import RunSummary

#: Engine settings accepted as keyword arguments: those a command line may set
#: (declared once, on :class:`~cdr_local.engine.EngineSettings`' fields).
ENGINE_KEYS = CLI_KEYS


def _choice(pair: str | PairChoice | None, strong: str | None, weak: str | None, strong_system: str | None,
            weak_system: str | None) -> PairChoice:
    """The pair to score with: a name, or --strong/--weak, or a ready :class:`PairChoice` (the CLI's)."""
    if isinstance(pair, PairChoice):
        if (strong, weak, strong_system, weak_system) != (None, None, None, None):
            raise TypeError("a PairChoice already names the models: give strong/weak in it, not beside it")
        c = pair
    else:
        c = PairChoice(pair, strong, weak, strong_system, weak_system)
    c.check()
    return c


def _engine(kw: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(set(kw) - set(ENGINE_KEYS))
    if bad:
        raise TypeError(f"unknown option(s) {', '.join(bad)}; engine settings are {', '.join(ENGINE_KEYS)}")
    return {k: kw.get(k) for k in ENGINE_KEYS}


class Annotator:
    """A loaded pair with its profile, router, rule and calibration: score records
    in Python.  ``score`` returns exactly the record ``cdr annotate`` writes."""

    def __init__(self, pair: str | PairChoice | None = None, *, strong: str | None = None, weak: str | None = None,
                 strong_system: str | None = None, weak_system: str | None = None, models: str | Path | None = None,
                 profile: str = "none", router: str | None = None, rule: str | None = None,
                 calibration: str | Path | None = None, token_logprobs: bool = False, pull: bool = True,
                 method: str | None = None, **engine: Any) -> None:
        from .assembly import engine_settings, registry_and_pair
        from .calibration import resolve
        from .profiles import load_profile
        from .runs import ScoringSpec

        reg, name = registry_and_pair(Path(models) if models is not None else None,
                                      _choice(pair, strong, weak, strong_system, weak_system))
        prof = load_profile(profile)
        cal = resolve(reg, name, Path(calibration) if calibration is not None else None)
        from .methods import parse_methods

        parse_methods(method)
        # the very task (and metadata) an annotate run builds
        self._built = ScoringSpec(reg, name, engine_settings(reg, _engine(engine)), prof, router, pull, token_logprobs,
                                  rule, cal, method)()
        self.task = cast("AnnotateTask", self._built.task)
        self.pair = self.task.pair

    def metadata(self) -> dict[str, Any]:
        """What an output's sidecar records: the models, their sha256, the settings, the rule."""
        return dict(self._built.meta)

    def score_record(self, record: dict[str, Any], line: int = 1) -> dict[str, Any]:
        """One input record (any format ``cdr annotate`` reads) -> its output record.
        A record the pipeline would reject raises ``CdrError`` with the reason."""
        import orjson

        from .errors import CdrError
        from .pipeline import RecordError
        from .records import Reject, parse_line

        item = parse_line(orjson.dumps(record), line)
        if item is None or isinstance(item, Reject):
            raise CdrError(item.reason if isinstance(item, Reject) else "empty record")
        try:
            obj, _ = self.task.process(item)
        except RecordError as e:
            raise CdrError(str(e)) from None
        return obj

    def score(self, prompt: str | Sequence[dict[str, str]], responses: Sequence[str], *, id: str = "api",
              system: str | None = None) -> dict[str, Any]:
        """Score responses to one prompt (a string, or a TRL message list)."""
        rec: dict[str, Any] = {"id": id, "prompt": prompt, "responses": list(responses)}
        if system is not None:
            if not isinstance(prompt, str):
                raise TypeError("system goes with a string prompt; put it in the message list instead")
            rec["prompt"] = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        return self.score_record(rec)

    def score_records(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for i, r in enumerate(records, 1):
            yield self.score_record(r, i)

    def close(self) -> None:
        self._built.close()

    def __enter__(self) -> Annotator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score(prompt: str | Sequence[dict[str, str]], responses: Sequence[str], *, system: str | None = None,
          id: str = "api", **options: Any) -> dict[str, Any]:
    """Load the pair, score one prompt's responses, close: ``cdr score`` (whose record id is "cli")."""
    with Annotator(**options) as a:
        return a.score(prompt, responses, system=system, id=id)


def _scoring_options(pair: str | None, strong: str | None, weak: str | None, strong_system: str | None,
                     weak_system: str | None, engine: dict[str, Any], **kw: Any) -> Any:
    from .runs import ScoringOptions

    return ScoringOptions(pair=_choice(pair, strong, weak, strong_system, weak_system), engine=_engine(engine), quiet=True, **kw)


def annotate_file(input: str | Path, output: str | Path, *, pair: str | None = None, strong: str | None = None,
             weak: str | None = None, strong_system: str | None = None, weak_system: str | None = None,
             models: str | Path | None = None, profile: str = "none", router: str | None = None, rule: str | None = None,
             calibration: str | Path | None = None, min_confidence: float | None = None, keep_top: float | None = None,
             resume: bool = False, overwrite: bool = False, force: bool = False, rejects: str | None = None,
             limit: int | None = None, pull: bool = True, method: str | None = None, **engine: Any) -> RunSummary:
    """``cdr annotate INPUT -o OUTPUT``: stream, write, resume; returns the run's counts."""
    from .runs import run_scoring

    opts = _scoring_options(pair, strong, weak, strong_system, weak_system, engine, models=models, profile=profile,
                            router=router, rule=rule, calibration=calibration, min_confidence=min_confidence,
                            keep_top=keep_top, resume=resume, overwrite=overwrite, force=force, rejects=rejects,
                            limit=limit, pull=pull, method=method)
    return run_scoring("annotate", str(input), str(output), opts)


def evaluate_file(input: str | Path, output: str | Path, *, per_section: int | None = None, seed: int = 0,
             bootstrap: int = 1000, rules: Sequence[str] = (), calibrate: bool = False, pair: str | None = None,
             strong: str | None = None, weak: str | None = None, strong_system: str | None = None,
             weak_system: str | None = None, models: str | Path | None = None, profile: str = "none",
             router: str | None = None, rule: str | None = None, calibration: str | Path | None = None,
             resume: bool = False, overwrite: bool = False, force: bool = False, limit: int | None = None,
             token_logprobs: bool = False, pull: bool = True, method: str | None = None, **engine: Any) -> dict[str, Any]:
    """``cdr eval INPUT -o OUTPUT``: score labelled pairs, then return the report
    (also written to OUT.report.json, OUT.rewardbench.json, and with ``calibrate``
    OUT.calibration.json)."""
    from .runs import eval_paths, eval_report, eval_sample, run_scoring

    _, reports = eval_paths(str(output), None, calibrate)
    select = eval_sample(str(input), per_section, seed)
    opts = _scoring_options(pair, strong, weak, strong_system, weak_system, engine, models=models, profile=profile,
                            router=router, rule=rule, calibration=calibration, resume=resume, overwrite=overwrite,
                            force=force, limit=limit, pull=pull, select=select, token_logprobs=token_logprobs,
                            also_writes=tuple(reports), method=method)
    run_scoring("eval", str(input), str(output), opts)
    rep, _, _ = eval_report(str(output), rule=rule, method=method, rules=list(rules), bootstrap=bootstrap, calibrate=calibrate,
                            models=models, per_section=per_section, seed=seed)
    import orjson

    # plain Python values, exactly the report file's (numpy scalars and tuples become floats and lists)
    return dict(orjson.loads(orjson.dumps(rep, option=orjson.OPT_SERIALIZE_NUMPY)))
