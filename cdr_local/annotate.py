"""The annotate task: score a record's responses with a pair and write TRL-ready output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .chat import TemplateError
from .pipeline import RecordError
from .profiles import Profile, load_profile, profile_messages
from .records import Record
from .reward import ResponseScore, judge

if TYPE_CHECKING:
    from .calibration import Calibration, Confidence
    from .pair import LoadedPair
    from .router import Router
    from .rules import RuleSpec

# keys the output owns; input fields with these names are kept as input_<key>
OUTPUT_KEYS = {
    "id", "prompt", "chosen", "rejected", "margin", "margin_value", "margin_z", "confidence", "margin_mean", "label", "tie", "agree",
    "scores", "truncated", "input_format", "line", "domain", "domain_source", "responses",
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


def build_output(record: Record, scores: list[ResponseScore], *, token_logprobs: bool = False,
                 rule: RuleSpec | None = None, confidence: Confidence | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """The output line for one record, and the stats the progress display shows.

    ``rule`` decides the label (default: cdr-sum, CDR as published); ``margin``
    is the rule's value(chosen) - value(rejected), ``margin_z`` that margin
    over how its noise grows with length, ``confidence`` P(label right) from
    ``confidence`` (a calibration, or the uncalibrated default)."""
    from .calibration import Confidence as _Confidence
    from .rules import DEFAULT_RULE, parse_rule

    rule = rule or parse_rule(DEFAULT_RULE)
    confidence = confidence or _Confidence()
    resp = [s.response(len(record.responses[i])) for i, s in enumerate(scores)]
    values = rule.values(resp)
    j = judge(scores, values)
    obj: dict[str, Any] = {"id": record.id, "prompt": record.prompt_raw}
    if record.fmt == "responses":  # keep every text: `cdr pairs` reads them back
        obj["responses"] = [record.as_response(r) for r in record.responses]
    n = len(scores)
    if n >= 2:
        obj["chosen"] = record.as_response(record.responses[j.best])
        obj["rejected"] = record.as_response(record.responses[j.worst])
        obj["margin_z"] = rule.rule.z(j.margin, resp[j.best], resp[j.worst])
        obj["confidence"] = 0.5 if j.tie else confidence(obj["margin_z"])
        obj["margin"] = trl_margin(obj["confidence"])
        obj["margin_value"] = j.margin
        obj["margin_mean"] = j.margin_mean
        obj["label"] = "tie" if j.tie else record.response_name(j.best)
        obj["tie"] = j.tie
        if record.fmt == "chosen_rejected":
            obj["agree"] = (not j.tie) and j.best == 0
    obj["scores"] = [
        {
            "response": record.response_name(i),
            "value": values[i],
            "reward": s.reward,
            "reward_mean": s.reward_mean,
            "strong_logprob": s.strong.logprob,
            "strong_tokens": s.strong.n_tokens,
            "weak_logprob": s.weak.logprob,
            "weak_tokens": s.weak.n_tokens,
            "truncated": s.truncated,
            "chars": len(record.responses[i]),
            **({"strong_token_logprobs": list(s.strong.token_logprobs), "weak_token_logprobs": list(s.weak.token_logprobs)} if token_logprobs else {}),
        }
        for i, s in enumerate(scores)
    ]
    obj["truncated"] = any(s.truncated for s in scores)
    obj["input_format"] = record.fmt
    for k, v in record.extra.items():
        obj[f"input_{k}" if k in OUTPUT_KEYS else k] = v
    stats: dict[str, float] = {
        "tokens": float(sum(s.strong.n_tokens + s.weak.n_tokens for s in scores)),
        "truncated": float(obj["truncated"]),
    }
    if n >= 2:
        stats["margin"] = j.margin
        stats["confidence"] = obj["confidence"]
        stats["tie"] = float(j.tie)
        if not j.tie:
            stats["first_wins"] = float(j.best == 0)
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
    decides the criteria and exemplars that both models read.
    """

    def __init__(self, pair: LoadedPair, profile: Profile | None = None, router: Router | None = None,
                 *, token_logprobs: bool = False, rule: str | None = None, calibration: Calibration | None = None) -> None:
        from .calibration import Confidence
        from .router import NoneRouter
        from .rules import DEFAULT_RULE, parse_rule

        self.token_logprobs = token_logprobs
        self.calibration = calibration
        self.rule = parse_rule(rule or (calibration.rule if calibration else DEFAULT_RULE), calibration.params if calibration else None)
        self.confidence = calibration.confidence_for(self.rule.label()) if calibration else Confidence()
        self.pair = pair
        self.profile = profile or load_profile("none")
        self.router = router or NoneRouter(self.profile)

    def metadata(self) -> dict[str, Any]:
        cal = self.calibration
        return {"profile": {"name": self.profile.name, "path": self.profile.path, "sha256": self.profile.sha256,
                            "domains": list(self.profile.domains)}, "router": self.router.name,
                "rule": {"label": self.rule.label(), **self.rule.to_json(), "summary": self.rule.rule.summary},
                "confidence": {"calibrated": self.confidence.calibrated, "a": self.confidence.a, "b": self.confidence.b,
                               "calibration": cal.path if cal else None,
                               "model": "P(label right) = sigmoid(a + b * |margin_z|)"
                               + ("" if self.confidence.calibrated else " (uncalibrated default: no calibration for this pair and rule)")}}

    def numerics(self) -> dict[str, Any]:
        return {"profile.sha256": self.profile.sha256, "router": self.router.name, "rule": self.rule.label(),
                "rule.params": self.rule.to_json()["params"], "confidence": [self.confidence.a, self.confidence.b]}

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
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
            scores = self.pair.score(profile_messages(self.profile, domain, record.messages, record.id), record.responses)
        except TemplateError as e:
            raise RecordError(str(e)) from None
        obj, stats = build_output(record, scores, token_logprobs=self.token_logprobs, rule=self.rule, confidence=self.confidence)
        obj["domain"] = domain
        obj["domain_source"] = source
        obj.pop("input_domain", None)
        return obj, stats
