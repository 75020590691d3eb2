"""The annotate task: score a record's responses with a pair and write TRL-ready output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .chat import TemplateError
from .pipeline import RecordError
from .records import Record
from .reward import ResponseScore, judge

if TYPE_CHECKING:
    from .pair import LoadedPair

# keys the output owns; input fields with these names are kept as input_<key>
OUTPUT_KEYS = {
    "id", "prompt", "chosen", "rejected", "margin", "margin_mean", "label", "tie", "agree",
    "scores", "truncated", "input_format", "line",
}


def _as_response(record: Record, text: str) -> Any:
    """TRL form: a string, or [{role: assistant, content}] when the input was conversational."""
    return [{"role": "assistant", "content": text}] if record.conversational else text


def build_output(record: Record, scores: list[ResponseScore]) -> tuple[dict[str, Any], dict[str, float]]:
    """The output line for one record, and the stats the progress display shows."""
    j = judge(scores)
    obj: dict[str, Any] = {"id": record.id, "prompt": record.prompt_raw}
    n = len(scores)
    if n >= 2:
        obj["chosen"] = _as_response(record, record.responses[j.best])
        obj["rejected"] = _as_response(record, record.responses[j.worst])
        obj["margin"] = j.margin
        obj["margin_mean"] = j.margin_mean
        obj["label"] = "tie" if j.tie else record.response_name(j.best)
        obj["tie"] = j.tie
        if record.fmt == "chosen_rejected":
            obj["agree"] = (not j.tie) and j.best == 0
    obj["scores"] = [
        {
            "response": record.response_name(i),
            "reward": s.reward,
            "reward_mean": s.reward_mean,
            "strong_logprob": s.strong.logprob,
            "strong_tokens": s.strong.n_tokens,
            "weak_logprob": s.weak.logprob,
            "weak_tokens": s.weak.n_tokens,
            "truncated": s.truncated,
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
        stats["tie"] = float(j.tie)
        if not j.tie:
            stats["first_wins"] = float(j.best == 0)
    return obj, stats


class AnnotateTask:
    """Pipeline task: one record in, one scored output line out."""

    def __init__(self, pair: LoadedPair) -> None:
        self.pair = pair

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        try:
            scores = self.pair.score(record.messages, record.responses)
        except TemplateError as e:
            raise RecordError(str(e)) from None
        return build_output(record, scores)
