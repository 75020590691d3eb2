"""RMBoost: preference-conditional synthetic pairs (arXiv 2407.16008).

For each prompt: generate response 1; *then* draw the label (is response 2
better or worse?) and the quality aspects; then generate response 2 from a
conditioning prompt that shows the request, response 1, the direction and the
aspects.  The pair therefore differs on purpose, along the chosen aspects.
Optionally a CDR pair verifies each pair (does the density ratio agree with
the intended label?).  Every random choice is seeded per record, so a rerun or
a resumed run reproduces the same pairs.

Templates ship in ``synth_templates/``: ``rmboost`` (the default, the paper's
recipe: a guideline of defined aspects, an *edit* of response 1, the answer
between ``<response>`` tags, bounded retries when the edit changes nothing) and
``rewrite`` (cdr-local's earlier variant: a new second answer, one bare aspect).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat import Message
from .errors import ConfigError
from .pairs import record_rng
from .pipeline import RecordError
from .records import Record

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from .pair import LoadedPair
    from .scoring import ChatSide

TEMPLATES_DIR = Path(__file__).resolve().parent / "synth_templates"
DEFAULT_TEMPLATE = "rmboost"
SHIPPED_TEMPLATES = TEMPLATES_DIR / f"{DEFAULT_TEMPLATE}.toml"  # the default's file
OUTPUT_KEYS = {"id", "prompt", "chosen", "rejected", "margin", "label", "aspects", "response_1", "response_2",
               "seeds", "retries", "cut_at_max_tokens", "generation", "verify"}
MAX_RETRIES = 10
PLACEHOLDERS = ("prompt", "response1", "direction", "aspects", "guideline")


@dataclass(frozen=True)
class SynthTemplates:
    aspects: tuple[str, ...]
    n_aspects: int
    response_system: str
    conditioning_system: str
    conditioning_user: str
    better: str
    worse: str
    path: str = ""
    definitions: tuple[str, ...] = ()  # one per aspect ("" = a bare name), for {guideline}
    response_tag: str = ""  # "response": response 2 is the text between <response> and </response>
    retries: int = 0  # response 2 equal to response 1: generate again, at most this many times

    def guideline(self, aspects: list[str]) -> str:
        """The drawn aspects with their definitions, one ``- name: definition`` line each."""
        defs = dict(zip(self.aspects, self.definitions or ("",) * len(self.aspects), strict=True))
        return "\n".join(f"- {a}: {defs[a]}" if defs[a] else f"- {a}" for a in aspects)


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.toml"))


def template_path(name_or_path: str | Path | None = None) -> Path:
    """A shipped template by name (``rmboost``, ``rewrite``), else a file; ``None`` is the default."""
    if name_or_path is None:
        return SHIPPED_TEMPLATES
    if isinstance(name_or_path, str) and name_or_path in shipped_templates():
        return TEMPLATES_DIR / f"{name_or_path}.toml"
    p = Path(name_or_path)
    if isinstance(name_or_path, str) and p.suffix != ".toml" and "/" not in name_or_path and not p.exists():
        raise ConfigError(f"unknown synth template {name_or_path!r}; shipped: {', '.join(shipped_templates())} (or a .toml file)")
    return p


def load_templates(path: str | Path | None = None) -> SynthTemplates:
    """A template by shipped name or path (``None``: the default, ``rmboost``)."""
    p = template_path(path)
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read synth templates {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"synth templates {p}: invalid TOML: {e}") from None
    need = {"aspects", "n_aspects", "response_system", "conditioning_system", "conditioning_user", "better", "worse"}
    optional = {"response_tag", "retries"}
    missing, unknown = need - set(d), set(d) - need - optional
    if missing or unknown:
        raise ConfigError(f"synth templates {p}: " + "; ".join(
            ([f"missing {', '.join(sorted(missing))}"] if missing else []) + ([f"unknown {', '.join(sorted(unknown))}"] if unknown else [])))
    raw = d["aspects"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"synth templates {p}: aspects must be a non-empty list of strings or of {{name, definition}} tables")
    aspects: list[str] = []
    definitions: list[str] = []
    for a in raw:
        if isinstance(a, str) and a:
            aspects.append(a)
            definitions.append("")
        elif isinstance(a, dict) and set(a) == {"name", "definition"} and all(isinstance(a[k], str) and a[k].strip() for k in a):
            aspects.append(a["name"])
            definitions.append(a["definition"].strip())
        else:
            raise ConfigError(f"synth templates {p}: aspects must be a non-empty list of strings or of {{name, definition}} tables")
    if len(set(aspects)) != len(aspects):
        raise ConfigError(f"synth templates {p}: aspects must be distinct")
    n = d["n_aspects"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(aspects):
        raise ConfigError(f"synth templates {p}: n_aspects must be between 1 and {len(aspects)}")
    for k in ("response_system", "conditioning_system", "conditioning_user", "better", "worse", "response_tag"):
        if not isinstance(d.get(k, ""), str):
            raise ConfigError(f"synth templates {p}: {k} must be a string")
    tag = d.get("response_tag", "")
    if tag and not all(c.isalnum() or c in "_-" for c in tag):
        raise ConfigError(f"synth templates {p}: response_tag must be a tag name (letters, digits, _ or -), e.g. \"response\"")
    retries = d.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ConfigError(f"synth templates {p}: retries must be between 0 and {MAX_RETRIES}")
    # fill the template once with markers: a stray brace or an unknown placeholder
    # is a config error now, not a traceback at the first record
    probe = {k: f"\x00{k}\x00" for k in PLACEHOLDERS}
    try:
        filled = d["conditioning_user"].format(**probe)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"synth templates {p}: conditioning_user: bad placeholder or stray brace ({e!s}); "
            "the placeholders are {prompt}, {response1}, {direction}, {aspects}, {guideline}; write a literal brace as {{ or }}"
        ) from None
    for k in ("prompt", "response1", "direction"):
        if probe[k] not in filled:
            raise ConfigError(f"synth templates {p}: conditioning_user must contain {{{k}}}")
    if probe["aspects"] not in filled and probe["guideline"] not in filled:
        raise ConfigError(f"synth templates {p}: conditioning_user must contain {{aspects}} or {{guideline}}")
    return SynthTemplates(tuple(aspects), n, str(d["response_system"]), str(d["conditioning_system"]),
                          str(d["conditioning_user"]), str(d["better"]), str(d["worse"]), str(p),
                          tuple(definitions), tag, retries)


def prompt_text(record: Record) -> str:
    """The request as the conditioning prompt shows it: the last user turn."""
    users = [m.content for m in record.messages if m.role == "user"]
    return users[-1] if users else ""


def draw(record_id: str, seed: int, t: SynthTemplates) -> tuple[str, list[str]]:
    """The label (is response 2 'better' or 'worse'?) and the aspects, seeded per record."""
    rng = record_rng(record_id, seed)
    label = rng.choice(["better", "worse"])
    aspects = rng.sample(list(t.aspects), t.n_aspects)
    return label, aspects


def response1_messages(t: SynthTemplates, record: Record) -> list[Message]:
    msgs = list(record.messages)
    if t.response_system and not (msgs and msgs[0].role == "system"):
        msgs = [Message("system", t.response_system), *msgs]
    return msgs


def conditioning_messages(t: SynthTemplates, prompt: str, response1: str, label: str, aspects: list[str]) -> list[Message]:
    """The messages that ask for response 2 (documented in the template files)."""
    user = t.conditioning_user.format(
        prompt=prompt, response1=response1, direction=t.better if label == "better" else t.worse, aspects=" and ".join(aspects),
        guideline=t.guideline(aspects),
    )
    msgs = [Message("user", user)]
    if t.conditioning_system:
        msgs.insert(0, Message("system", t.conditioning_system))
    return msgs


def gen_seed(record_id: str, seed: int, which: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}:{which}".encode()).digest()[:8], "little")


def response2_seed(record_id: str, seed: int, attempt: int) -> int:
    """Attempt 0 is ``gen_seed(.., "r2")``; retry k draws from ``"r2.k"``."""
    return gen_seed(record_id, seed, "r2" if attempt == 0 else f"r2.{attempt}")


def extract_tagged(text: str, tag: str, *, cut: bool = False) -> str | None:
    """The text between the first ``<tag>`` and the ``</tag>`` after it, stripped (None without both).

    ``cut``: the generation stopped at --max-tokens, not at its end, so a missing
    ``</tag>`` is the cut, not a missing tag: the text after ``<tag>`` counts (as any
    response cut at --max-tokens does)."""
    open_, close = f"<{tag}>", f"</{tag}>"
    i = text.find(open_)
    if i < 0:
        return None
    j = text.find(close, i + len(open_))
    if j < 0:
        return text[i + len(open_) :].strip() if cut else None
    return text[i + len(open_) : j].strip()


class SynthTask:
    def __init__(
        self,
        side: ChatSide,
        templates: SynthTemplates,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int = 0,
        verifier: LoadedPair | None = None,
        keep: str = "all",
    ) -> None:
        self.side = side
        self.t = templates
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.verifier = verifier
        self.keep = keep
        self.generated = 0

    def generation_settings(self) -> dict[str, Any]:
        return {"model": self.side.model.name, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens, "seed": self.seed, "templates": self.t.path}

    def _generate(self, messages: list[Message], seed: int) -> tuple[str, int, bool]:
        """The text, the tokens generated, and whether --max-tokens (or n_ctx) cut it."""
        m = self.side.model
        ctx = self.side.context_tokens(messages)
        room = m.n_ctx - len(ctx) - 1
        if room < 8:
            raise RecordError("prompt too long to generate a response in n_ctx")
        toks = m.generate(tuple(ctx), max_tokens=min(self.max_tokens, room), temperature=self.temperature, top_p=self.top_p, seed=seed)
        ended = bool(toks) and m.is_eog(toks[-1])
        body = toks[:-1] if ended else toks
        return m.detokenize(body).strip(), len(toks), not ended

    def _response2(self, record: Record, r1: str, label: str, aspects: list[str]) -> tuple[str, int, int, int, bool]:
        """Response 2, its seed, the tokens generated for it (all attempts), the retries it
        took, and whether --max-tokens cut it."""
        cond = conditioning_messages(self.t, prompt_text(record), r1, label, aspects)
        detail = {"label": label, "aspects": aspects}
        n = 0
        for attempt in range(self.t.retries + 1):
            s2 = response2_seed(record.id, self.seed, attempt)
            text, k, was_cut = self._generate(cond, s2)
            n += k
            if self.t.response_tag:
                tagged = extract_tagged(text, self.t.response_tag, cut=was_cut)
                if tagged is None:
                    raise RecordError(f"skipped: no <{self.t.response_tag}> tags in the generation",
                                      detail={**detail, "attempt": attempt, "generation": text[:2000]})
                text = tagged
            if not text:
                raise RecordError("skipped: response 2 came out empty")
            if text != r1:
                return text, s2, n, attempt, was_cut
        raise RecordError("skipped: response 2 is identical to response 1"
                          + (f" (also after {self.t.retries} retries)" if self.t.retries else ""), detail=detail)

    def process(self, record: Record) -> tuple[dict[str, Any], dict[str, float]]:
        s1 = gen_seed(record.id, self.seed, "r1")
        r1, n1, cut1 = self._generate(response1_messages(self.t, record), s1)
        if not r1:
            raise RecordError("skipped: response 1 came out empty")
        label, aspects = draw(record.id, self.seed, self.t)
        r2, s2, n2, retries, cut2 = self._response2(record, r1, label, aspects)
        chosen, rejected = (r2, r1) if label == "better" else (r1, r2)
        obj: dict[str, Any] = {
            "id": record.id,
            "prompt": record.prompt_raw,
            "chosen": record.as_response(chosen),
            "rejected": record.as_response(rejected),
            "margin": None,
            "label": label,
            "aspects": aspects,
            "response_1": r1,
            "response_2": r2,
            "seeds": {"response_1": s1, "response_2": s2, "label": self.seed},
            "retries": retries,
            "cut_at_max_tokens": {"response_1": cut1, "response_2": cut2},
            "generation": self.generation_settings(),
        }
        stats: dict[str, float] = {"tokens": float(n1 + n2)}
        if self.verifier is not None:
            sc = self.verifier.score(record.messages, [r1, r2])
            rw1, rw2 = sc[0].reward, sc[1].reward
            agree = (rw2 > rw1) if label == "better" else (rw2 < rw1)
            obj["verify"] = {"pair": self.verifier.spec.name, "reward_1": rw1, "reward_2": rw2, "agree": agree}
            obj["margin"] = (rw2 - rw1) if label == "better" else (rw1 - rw2)
            if self.keep == "agree" and not agree:
                raise RecordError(
                    f"skipped: the density ratio disagrees with the intended label ({label})",
                    detail={"label": label, "aspects": aspects, "verify": obj["verify"]},
                )
            stats["margin"] = float(obj["margin"])
        for k, v in record.extra.items():
            if k in {"chosen", "rejected", "response_a", "response_b", "responses"}:
                continue
            obj[f"input_{k}" if k in OUTPUT_KEYS else k] = v
        return obj, stats


def agreement_report(path: str | Path, rejects: str | Path | None = None) -> dict[str, Any]:
    """Agreement of the verifier with the intended labels, overall, per aspect and per label.

    Counts the kept pairs in ``path`` and, with ``--keep agree``, the pairs that
    were dropped for disagreeing (their verdicts are in the rejects file).
    """
    import orjson

    tot = [0, 0]
    per_aspect: dict[str, list[int]] = {}
    per_label: dict[str, list[int]] = {}

    def rows() -> Any:
        for p, key in ((path, None), (rejects, "detail")):
            if p is None or not Path(p).exists():
                continue
            with open(p, "rb") as f:
                for line in f:
                    if line.strip():
                        o = orjson.loads(line)
                        o = o.get(key) if key else o
                        if isinstance(o, dict):
                            yield o

    for o in rows():
        v = o.get("verify")
        if not v:
            continue
        a = int(bool(v["agree"]))
        tot[0] += a
        tot[1] += 1
        for asp in o.get("aspects", []):
            per_aspect.setdefault(asp, [0, 0])
            per_aspect[asp][0] += a
            per_aspect[asp][1] += 1
        lab = per_label.setdefault(str(o.get("label")), [0, 0])
        lab[0] += a
        lab[1] += 1

    def rate(x: list[int]) -> dict[str, Any]:
        return {"agree": x[0], "n": x[1], "rate": x[0] / x[1] if x[1] else None}

    return {"overall": rate(tot), "per_aspect": {k: rate(v) for k, v in sorted(per_aspect.items())},
            "per_label": {k: rate(v) for k, v in sorted(per_label.items())}}
