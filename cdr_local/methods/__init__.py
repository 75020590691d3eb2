"""Scoring methods: how a record's responses get the values that label them.

A *method* is one module: it reads a record's responses through the loaded
pair (its own scoring pass) and returns, per response, a value (higher is
preferred) and the named components it measured, plus how a margin between
two of its values reads as a z-like statistic (what a calibration maps to a
confidence).  ``annotate``, ``eval``, ``pairs`` and ``winrate`` take methods by
name (``--method``); the first one named labels, the others are measured
alongside, so that one ``cdr eval --method cdr,judge`` run reports both on the
same pairs.

Shipped methods:

* ``cdr`` (:mod:`.density`): the density ratio, log p_strong(y|x) - log p_weak(y|x),
  with the scoring rule of ``--rule`` (every rule of :mod:`cdr_local.rules` is
  computed from its one pass);
* ``strong`` (:mod:`.density`): the same pass labelled by the strong model's
  log-likelihood alone (rule ``strong-sum``; ``--rule strong-mean`` for the
  per-token form);
* ``judge`` (:mod:`.judge`): the strong model reads the question and two
  responses and scores the verdict "A" against "B", in both orders, averaged
  (position bias cancels).

Adding one: a module with a class that implements :class:`Method` (its
``score`` returns a :class:`Scored`), and an entry in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CdrError

if TYPE_CHECKING:
    from ..calibration import Calibration
    from ..chat import Message
    from ..pair import LoadedPair
    from ..profiles import Profile
    from ..records import Record


@dataclass(frozen=True)
class Scored:
    """What one method measured on one record's responses.

    ``fields[i]`` are response ``i``'s named components (written into the
    output's ``scores[i]``), ``bulk[i]`` large per-token arrays written after
    them; ``record`` holds record-level components (the judge's position bias).
    """

    method: str
    values: list[float]
    fields: list[dict[str, Any]]
    truncated: list[bool]
    tokens: float
    z: Callable[[float, int, int], float]  # (margin, best, worst) -> z-like statistic
    pair_fields: Callable[[int, int], dict[str, Any]] = lambda best, worst: {}
    record: dict[str, Any] = field(default_factory=dict)
    bulk: list[dict[str, Any]] = field(default_factory=list)


class Method(Protocol):
    """A scoring method bound to a loaded pair."""

    #: the name outputs and reports know it by (``cdr-sum``, ``judge``)
    label: str

    def score(self, record: Record, messages: Sequence[Message], domain: str | None = None) -> Scored:
        """Score the record's responses; ``messages`` is the conversation the
        profile customized for the routed ``domain``."""
        ...

    def metadata(self) -> dict[str, Any]: ...

    def numerics(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    build: Callable[..., Method]
    #: a method of the density pass labels with a scoring rule: this one unless the run
    #: names another (``--rule``, a calibration's); None: the method's own values label
    rule: str | None = None


def _density(name: str) -> Callable[..., Method]:
    def build(pair: LoadedPair, *, rule: str | None, calibration: Calibration | None, profile: Profile,
              token_logprobs: bool = False) -> Method:
        from .density import DensityMethod

        return DensityMethod(pair, name, rule=rule, calibration=calibration, token_logprobs=token_logprobs)

    return build


def _judge(pair: LoadedPair, *, rule: str | None, calibration: Calibration | None, profile: Profile,
           token_logprobs: bool = False) -> Method:
    from .judge import JudgeMethod

    return JudgeMethod(pair, profile=profile)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("cdr", "the density ratio log p_strong - log p_weak, labelled by --rule (default: the calibration's, else cdr-sum)",
                   _density("cdr"), rule="cdr-sum"),
        MethodInfo("strong", "the strong model's log-likelihood alone (rule strong-sum, or --rule strong-mean)", _density("strong"),
                   rule="strong-sum"),
        MethodInfo("judge", "the strong model as a pairwise judge: log P(verdict A) - log P(verdict B), both orders averaged",
                   _judge),
    )
}
DEFAULT_METHOD = "cdr"
#: the methods of the density pass: they label with a scoring rule (``--rule``)
DENSITY = tuple(name for name, m in METHODS.items() if m.rule is not None)

#: methods whose values an output's ``scores`` entries hold under the method's own key,
#: and how a margin between two of them reads as a z-like statistic (what a calibration
#: maps to a confidence).  The judge's: half the margin, for two responses its
#: debiased log-odds (:mod:`.judge`).  (The density pass's rules are recomputed from
#: its sums instead: :mod:`cdr_local.rules`.)
MEASURED: dict[str, Callable[[float], float]] = {"judge": lambda margin: margin / 2}


def parse_methods(text: str | None) -> list[str]:
    """``cdr`` or ``judge,cdr``: the method names, the labelling one first; checked."""
    names = [x.strip() for x in (text or DEFAULT_METHOD).split(",") if x.strip()]
    if not names:
        raise CdrError(f"--method needs a name: {', '.join(METHODS)}")
    for n in names:
        if n not in METHODS:
            raise CdrError(f"unknown method {n!r}; choose one or more (comma-separated) of {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise CdrError(f"--method names a method twice: {text}")
    if "cdr" in names and "strong" in names:
        raise CdrError("--method cdr and strong share one scoring pass: name one (every rule is in its scores)")
    return names


def build_methods(names: Sequence[str], pair: LoadedPair, *, rule: str | None, calibration: Calibration | None,
                  profile: Profile, token_logprobs: bool = False) -> list[Method]:
    return [METHODS[n].build(pair, rule=rule, calibration=calibration, profile=profile, token_logprobs=token_logprobs)
            for n in names]


