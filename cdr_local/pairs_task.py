"""The pairs task: N responses -> one TRL preference pair, through the shared pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .pairs import NEEDS_EMBEDDINGS, SkipRecord, choose, cosine
from .pipeline import RecordError
from .records import Record
from .rules import Response

if TYPE_CHECKING:
    from .annotate import AnnotateTask
    from .calibration import Confidence
    from .embed import Embedder
    from .rules import RuleSpec


def _scored(record: Record) -> list[Response] | None:
    """The scoring pass's numbers already in the record (an annotate output read back), in ``scores`` order."""
    sc = record.extra.get("scores")
    if not isinstance(sc, list) or len(sc) != len(record.responses):
        return None
    try:
        return [Response.from_score(s) for s in sc]
    except (KeyError, TypeError, ValueError):
        return None


def rewards_from_input(record: Record, rule: RuleSpec | None = None, measured: str | None = None) -> list[float] | None:
    """The values of the scores already in the record, in response order: those of the
    ``measured`` method (:data:`methods.MEASURED`, e.g. ``judge``), else the rule's
    (default cdr-sum)."""
    from .rules import DEFAULT_RULE, parse_rule

    sc = record.extra.get("scores")
    if not isinstance(sc, list) or len(sc) != len(record.responses):
        return None
    if measured is not None:
        try:
            rewards = [float(s[measured]) for s in sc]
        except (KeyError, TypeError, ValueError):
            return None
    else:
        resp = _scored(record)
        if resp is None:
            return None
        rewards = (rule or parse_rule(DEFAULT_RULE)).values(resp)
    if record.fmt != "responses":
        # annotate writes the winner of a chosen/rejected (or response_a/response_b)
        # input as "chosen" but keeps "scores" in the input's order, named; "label"
        # names the winner: when it was the second one, the texts read back are swapped
        names = [s.get("response") if isinstance(s, dict) else None for s in sc]
        label = record.extra.get("label")
        if len(rewards) == 2 and isinstance(label, str) and label in names and names.index(label) == 1:
            rewards.reverse()
    return rewards


class PairsTask:
    def __init__(
        self,
        strategy: str,
        *,
        scorer: AnnotateTask | None,
        embedder: Embedder | None,
        min_margin: float | None = None,
        seed: int = 0,
        rule: RuleSpec | None = None,
        confidence: Confidence | None = None,
        method: str | None = None,
    ) -> None:
        from .calibration import Confidence as _Confidence
        from .rules import DEFAULT_RULE, parse_rule

        if strategy in NEEDS_EMBEDDINGS and embedder is None:
            raise ValueError(f"strategy {strategy} needs an embedding model")
        from .methods import MEASURED, parse_methods

        self.rule = scorer.rule if scorer is not None else (rule or parse_rule(DEFAULT_RULE))
        first = scorer.method_names[0] if scorer is not None else parse_methods(method)[0]
        self.measured = first if first in MEASURED else None  # its values are in the scores as they are
        self.confidence = scorer.confidence if scorer is not None else (confidence or _Confidence())
        self.strategy = strategy
        self.scorer = scorer
        self.embedder = embedder
        self.min_margin = min_margin
        self.seed = seed

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        rewards = rewards_from_input(record, self.rule, self.measured)
        resp = _scored(record)
        tokens = 0.0
        z_of: Any = None
        if rewards is None:
            if self.scorer is None:
                raise RecordError("record has no rewards (scores) and no pair was given to score it")
            _domain, _source, results = self.scorer.measure(record)
            rewards = list(results[0].values)
            z_of = results[0].z
            tokens = float(sum(r.tokens for r in results))
        emb = self.embedder.embed(record.responses) if (self.embedder is not None and self.strategy in NEEDS_EMBEDDINGS) else None
        try:
            c = choose(self.strategy, record.id, record.responses, rewards, emb, seed=self.seed)
        except SkipRecord as e:
            raise RecordError(f"skipped: {e}") from None
        if self.min_margin is not None and c.margin < self.min_margin:
            raise RecordError(f"skipped: margin {c.margin:.4f} below {self.min_margin}")
        sim = c.similarity
        if sim is None and self.embedder is not None:
            e2 = self.embedder.embed([record.responses[c.chosen], record.responses[c.rejected]])
            sim = cosine(e2[0], e2[1])

        obj: dict[str, Any] = {
            "id": record.id,
            "prompt": record.prompt_raw,
            "chosen": record.as_response(record.responses[c.chosen]),
            "rejected": record.as_response(record.responses[c.rejected]),
            **self._confidence(c, resp, record, rewards, z_of),
            "strategy": self.strategy,
            "chosen_index": c.chosen,
            "rejected_index": c.rejected,
            "rewards": rewards,
            "similarity": sim,
        }
        stats = {"tokens": tokens, "margin": c.margin, "confidence": obj["confidence"]}
        if sim is not None:
            stats["similarity"] = sim
        return obj, stats

    def _confidence(self, c: Any, resp: list[Response] | None, record: Record, rewards: list[float], z_of: Any = None) -> dict[str, Any]:
        """margin_z and confidence of the chosen pair (see annotate.build_output), and the
        labelling rule or method.  ``z_of``: the scoring method's (margin, best, worst) -> z,
        when the record was scored here."""
        from .methods import MEASURED

        z = 0.0
        label = self.measured or self.rule.label()
        if z_of is not None:
            z = z_of(c.margin, c.chosen, c.rejected)
        elif self.measured is not None:
            z = MEASURED[self.measured](c.margin)
        elif resp is not None and len(resp) == len(rewards):
            order = list(range(len(rewards)))
            if record.fmt != "responses" and rewards_from_input(record, self.rule) is not None:  # (density rules only)
                # annotate's output keeps scores in the input's order; texts may be swapped (see rewards_from_input)
                vals = self.rule.values(resp)
                if vals != rewards:
                    order.reverse()
            z = self.rule.rule.z(c.margin, resp[order[c.chosen]], resp[order[c.rejected]])
        from .annotate import trl_margin

        conf = 0.5 if c.margin == 0 else self.confidence(z)
        return {"margin": trl_margin(conf), "margin_value": c.margin, "margin_z": z, "confidence": conf, "rule": label}
