"""The annotate task: score a record's responses with a pair and write TRL-ready output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .chat import TemplateError
from .pipeline import RecordError
from .profiles import Profile, load_profile, profile_messages
from .records import Record
from .reward import pick

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .calibration import Calibration, Confidence
    from .methods import Method, Scored
    from .pair import LoadedPair
    from .router import Router

# keys the output owns; input fields with these names are kept as input_<key>
OUTPUT_KEYS = {
    "id", "prompt", "chosen", "rejected", "margin", "margin_value", "margin_z", "confidence", "margin_mean", "label", "tie", "agree",
    "scores", "truncated", "input_format", "line", "domain", "domain_source", "responses", "judge",
}


def trl_margin(confidence: float) -> float:
    """TRL's ``margin`` column: the log-odds that the label is right, logit(confidence).

    TRL's reward trainer subtracts ``margin`` inside its loss, ``-logsigmoid(r_c - r_r -
    margin)``, so it must be on the reward model's own scale: for a Bradley-Terry
    model ``r_c - r_r`` *is* the logit of P(chosen preferred), and the calibrated
    confidence's logit asks the trained model to prefer chosen by as much as the
    annotator's evidence supports (0 for a tie or a coin flip, about 0.5-2 for
    confident labels).  The rule's raw margin (tens of nats for summed rules) is kept
    as ``margin_value``: fed to TRL as is, it would swamp the loss."""
    import math

    c = min(max(confidence, 1e-6), 1 - 1e-6)
    return 0.0 if c <= 0.5 else math.log(c / (1 - c))


def build_output(record: Record, results: Sequence[Scored], *, confidence: Confidence | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """The output line for one record, and the stats the progress display shows.

    ``results``: what each method measured (:mod:`methods`), the labelling one
    first.  ``margin_value`` is its value(chosen) - value(rejected),
    ``margin_z`` that margin over how its noise grows with length, ``confidence``
    P(label right) from ``confidence`` (a calibration, or the uncalibrated
    default), ``margin`` TRL's column (:func:`trl_margin`)."""
    from .calibration import Confidence as _Confidence

    confidence = confidence or _Confidence()
    lab = results[0]
    values = lab.values
    best, worst, tie = pick(values)
    obj: dict[str, Any] = {"id": record.id, "prompt": record.prompt_raw}
    if record.fmt == "responses":  # keep every text: `cdr pairs` reads them back
        obj["responses"] = [record.as_response(r) for r in record.responses]
    n = len(values)
    margin = values[best] - values[worst]
    if n >= 2:
        obj["chosen"] = record.as_response(record.responses[best])
        obj["rejected"] = record.as_response(record.responses[worst])
        obj["margin_z"] = lab.z(margin, best, worst)
        obj["confidence"] = 0.5 if tie else confidence(obj["margin_z"])
        obj["margin"] = trl_margin(obj["confidence"])
        obj["margin_value"] = margin
        for r in results:
            obj.update(r.pair_fields(best, worst))
        obj["label"] = "tie" if tie else record.response_name(best)
        obj["tie"] = tie
        if record.fmt == "chosen_rejected":
            obj["agree"] = (not tie) and best == 0
    for r in results:
        obj.update(r.record)
    truncated = [any(r.truncated[i] for r in results) for i in range(n)]
    obj["scores"] = [
        {
            "response": record.response_name(i),
            "value": values[i],
            **{k: v for r in results for k, v in r.fields[i].items()},
            "truncated": truncated[i],
            "chars": len(record.responses[i]),
            **{k: v for r in results if r.bulk for k, v in r.bulk[i].items()},
        }
        for i in range(n)
    ]
    obj["truncated"] = any(truncated)
    obj["input_format"] = record.fmt
    for k, v in record.extra.items():
        obj[f"input_{k}" if k in OUTPUT_KEYS else k] = v
    stats: dict[str, float] = {"tokens": float(sum(r.tokens for r in results)), "truncated": float(obj["truncated"])}
    if n >= 2:
        stats["margin"] = margin
        stats["confidence"] = obj["confidence"]
        stats["tie"] = float(tie)
        if not tie:
            stats["first_wins"] = float(best == 0)
    return obj, stats


def make_router(name: str | None, profile: Profile, pair: LoadedPair) -> Router:
    """``None`` picks the default: the answer router for a profile that ships its own
    router prompt (``cdr-paper``: the authors' recipe), else the model router when the
    profile has several domains, else none."""
    from .errors import ConfigError
    from .router import ROUTERS, AnswerRouter, KeywordRouter, ModelRouter, NoneRouter

    if name is None:
        name = "none" if len(profile.domains) < 2 else "answer" if profile.router_prompt else "model"
    if name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
    if name == "model":
        return ModelRouter(profile, pair.router_side())
    if name == "answer":
        return AnswerRouter(profile, pair.router_side())
    if name == "keywords":
        return KeywordRouter(profile)
    return NoneRouter(profile)


class AnnotateTask:
    """Pipeline task: one record in, one scored output line out.

    The profile's domain (from the record's ``domain`` field, else the router)
    decides the criteria and exemplars that both models read.  ``method``:
    the scoring methods (:mod:`methods`, ``cdr`` or ``judge,cdr``), the first
    labels; ``rule`` is the density methods' rule.
    """

    def __init__(self, pair: LoadedPair, profile: Profile | None = None, router: Router | None = None,
                 *, token_logprobs: bool = False, rule: str | None = None, calibration: Calibration | None = None,
                 method: str | None = None) -> None:
        from .calibration import Confidence
        from .methods import build_methods, parse_methods
        from .methods.density import DensityMethod, rule_for
        from .router import NoneRouter

        self.calibration = calibration
        self.method_names = parse_methods(method)
        self.profile = profile or load_profile("none")
        self.methods: list[Method] = build_methods(self.method_names, pair, rule=rule, calibration=calibration,
                                                   profile=self.profile, token_logprobs=token_logprobs)
        # the density rule (recorded, and read by `cdr pairs`): the density method's, else cdr's
        self.rule = next((m.rule for m in self.methods if isinstance(m, DensityMethod)), None) or rule_for("cdr", rule, calibration)
        self.label = self.methods[0].label
        self.confidence = calibration.confidence_for(self.label) if calibration else Confidence()
        self.pair = pair
        self.router = router or NoneRouter(self.profile)

    def metadata(self) -> dict[str, Any]:
        cal = self.calibration
        meta = {"profile": {"name": self.profile.name, "path": self.profile.path, "sha256": self.profile.sha256,
                            "domains": list(self.profile.domains)}, "router": self.router.name,
                "rule": {"label": self.rule.label(), **self.rule.to_json(), "summary": self.rule.rule.summary},
                "confidence": {"calibrated": self.confidence.calibrated, "a": self.confidence.a, "b": self.confidence.b,
                               "calibration": cal.path if cal else None,
                               "model": "P(label right) = sigmoid(a + b * |margin_z|)"
                               + ("" if self.confidence.calibrated else " (uncalibrated default: no calibration for this pair and rule)")}}
        if self.method_names != ["cdr"]:
            meta["method"] = {"names": self.method_names, "labels": self.label}
            for m in self.methods:
                meta.update({k: v for k, v in m.metadata().items() if k != "rule"})
        return meta

    def numerics(self) -> dict[str, Any]:
        out = {"profile.sha256": self.profile.sha256, "router": self.router.name, "rule": self.rule.label(),
               "rule.params": self.rule.to_json()["params"], "confidence": [self.confidence.a, self.confidence.b]}
        if self.method_names != ["cdr"]:
            out["method"] = self.method_names
            for m in self.methods:
                out.update({k: v for k, v in m.numerics().items() if not k.startswith("rule")})
        return out

    def measure(self, record: Record) -> tuple[str, str, list[Scored]]:
        """The record's domain, where it came from, and what each method measured."""
        given = record.extra.get("domain")
        if given is not None:
            if not isinstance(given, str) or given not in self.profile.domains:
                raise RecordError(f"domain {given!r} is not one of profile {self.profile.name!r}'s domains ({', '.join(self.profile.domains)})")
            domain, source = str(given), "input"
        else:
            try:
                domain, source = self.router.route(record.messages), self.router.name
            except TemplateError as e:
                raise RecordError(str(e)) from None
        try:
            messages = profile_messages(self.profile, domain, record.messages, record.id)
            return domain, source, [m.score(record, messages, domain) for m in self.methods]
        except TemplateError as e:
            raise RecordError(str(e)) from None

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        domain, source, results = self.measure(record)
        obj, stats = build_output(record, results, confidence=self.confidence)
        obj["domain"] = domain
        obj["domain_source"] = source
        obj.pop("input_domain", None)
        return obj, stats
