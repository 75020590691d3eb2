"""The model interface: what every caller of a loaded model may use.

A backend is one module with a class that implements :class:`LanguageModel`,
registered by name in ``engine/backends.py`` and loaded with
:func:`load_model`; nothing outside ``engine/`` constructs one.  Shipped:
``llama.cpp`` (``engine/llama.py``, the default) and ``transformers``
(``engine/hf.py``, an optional extra).

Scoring is ``loglikelihood(requests) -> results``, as lm-evaluation-harness's
``_loglikelihood_tokens``, batch in and list out, on token ids, with one
context shared by several continuations, so an implementation can decode the
context once.  This module imports nothing heavy, so the CLI starts fast.

Numerics contract: the log-probs of a request depend only on the request and
the :class:`EngineSettings` -- never on the other requests of a call, on what
was decoded before, or on where a resumed run restarted.  The llama.cpp engine
achieves this by decoding every request with a scheme fixed by the request
alone (see ``engine/llama.py``); the transformers engine runs each request as
one padded batch of its own continuations (see ``engine/hf.py``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    import numpy as np


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask and a cgroup CPU quota, where
    the platform says; else ``os.cpu_count()``."""
    n = os.cpu_count() or 1
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _setting(default: Any, *, flags: tuple[str, ...] = (), help: str = "", range: tuple[int, int] | None = None,
             toml: bool = False, opt_in: bool = False) -> Any:
    """One engine setting's declaration: its default, and what the registry and the CLI derive from it
    (``flags``: the command-line option, first name canonical; ``toml``: models.toml's ``[engine]``
    table may set it; ``range``: the accepted integers, checked everywhere the value can come from;
    ``opt_in``: only commands that ask for it offer the flag)."""
    return field(default=default, metadata={"flags": flags, "help": help, "range": range, "toml": toml, "opt_in": opt_in})


@dataclass(frozen=True)
class EngineSettings:
    """Everything that changes numbers or speed; recorded in every output's metadata.

    The one place engine settings are declared: models.toml's ``[engine]`` keys and
    their checks (:attr:`RANGES`, :attr:`FLAGS`), the commands' engine options
    (``cli/groups.py``) and the Python API's keyword arguments (:data:`CLI_KEYS`)
    are all read from these fields.

    Upper bounds of the ranges are sanity limits: llama.cpp allocates per thread
    and per context token without checking, and a typo (--threads 99999, --n-ctx
    99999999999) would otherwise crash or exhaust memory instead of failing in one
    line.  n_ctx is also checked against each model's trained context and the free
    memory when it loads.
    """

    n_ctx: int = _setting(4096, flags=("--n-ctx",), range=(32, 1 << 20), toml=True,
                          help="Context window in tokens; longer records are truncated (and flagged).")
    n_batch: int = _setting(512, flags=("--n-batch",), range=(16, 1 << 16), toml=True,
                            help="Tokens per llama_decode call.")
    n_ubatch: int = _setting(512, flags=("--n-ubatch",), range=(16, 1 << 16), toml=True, help="Physical batch size.")
    n_threads: int = _setting(0, flags=("--threads", "-t"), range=(0, 512), toml=True,
                              help="CPU threads (default: [engine] n_threads; 0 = all cores).")
    n_gpu_layers: int = _setting(0, flags=("--n-gpu-layers",), range=(-1, 100_000), toml=True,
                                 help="Layers on the GPU (-1 = all; needs a CUDA build).")
    #: responses of one record decoded side by side in one batch
    n_seq_max: int = _setting(8, range=(1, 256))
    parallel_responses: bool = _setting(
        False, flags=("--parallel-responses",), opt_in=True,
        help="Decode the responses of a record side by side (several sequences per decode). "
        "Faster on some machines, but a response's score then depends slightly on its sibling responses.")
    flash_attn: bool = False

    #: the accepted range of each integer setting (derived from the fields, below)
    RANGES: ClassVar[dict[str, tuple[int, int]]]
    #: the settings models.toml's ``[engine]`` table may hold, and each one's flag: the
    #: registry's checks, the CLI's error messages and the overrides all read these
    FLAGS: ClassVar[dict[str, str]]

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {v}" + (" (-1 = all layers)" if name == "n_gpu_layers" else ""))

    def threads(self) -> int:
        """``n_threads``, or for 0 the CPUs this process may run on (affinity), at least 1."""
        return self.n_threads if self.n_threads > 0 else available_cpus()

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["n_threads"] = self.threads()
        return d


EngineSettings.RANGES = {f.name: f.metadata["range"] for f in fields(EngineSettings) if f.metadata.get("range")}
EngineSettings.FLAGS = {f.name: f.metadata["flags"][0] for f in fields(EngineSettings) if f.metadata.get("toml")}
#: the settings a command line (and the Python API) may override, in declaration order
CLI_KEYS = tuple(f.name for f in fields(EngineSettings) if f.metadata.get("flags"))


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuations`` after ``context``.

    ``context`` is a tuple of token segments; the engine decodes each segment
    as a unit (so a prefix shared by many records, such as a system prompt
    with exemplars, can stay in the KV cache without changing any number).
    Each continuation's first token is predicted by the context's last token.
    """

    context: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def context_len(self) -> int:
        return sum(len(s) for s in self.context)


class LanguageModel(Protocol):
    """Everything callers use of a loaded model (``scoring.ChatSide``, ``embed``,
    ``router``, ``synth``, ``pair``).  Token ids are the backend's own."""

    name: str
    path: Path
    settings: EngineSettings
    n_ctx: int  # the context actually allocated (a backend may round it)
    n_vocab: int
    n_embd: int
    add_bos: bool  # tokenize(add_special=True) prepends bos_id
    bos_id: int  # -1: none
    eos_id: int
    eot_id: int
    embeddings: bool  # made for hidden_states()

    def chat_template(self) -> str | None:
        """The model's own chat template (GGUF ``tokenizer.chat_template``), if any."""
        ...

    def meta(self, key: str) -> str | None:
        """One GGUF metadata value as text (``general.name``, ...), or None."""
        ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's semantics: ``add_special`` adds BOS where the model adds one;
        ``parse_special`` reads special-token text (``<|im_end|>``) as that token."""
        ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def token_text(self, token: int) -> str: ...

    def is_eog(self, token: int) -> bool:
        """An end-of-generation token (EOS, EOT, ...)."""
        ...

    def end_token(self) -> int:
        """The token that ends an assistant turn when the template writes none."""
        ...

    def loglikelihood(self, requests: list[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per request, per continuation: float64 log-prob of each token."""
        ...

    def sibling(self, *, embeddings: bool = False) -> LanguageModel:
        """Another handle on the same weights with a cache of its own."""
        ...

    def generate(self, context: tuple[int, ...], *, max_tokens: int, temperature: float = 0.7, top_p: float = 0.95,
                 seed: int = 0, on_token: Any = None) -> list[int]:
        """Optional (synth, the answer router): a seeded sample; a backend without
        it raises ModelError."""
        ...

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """Optional (REAL embeddings): final hidden states after the output norm."""
        ...

    def describe(self) -> dict[str, Any]:
        """``backend``, ``library``, ``version`` and the ``numerics`` keys that
        change numbers: recorded in the metadata and guarded on --resume."""
        ...

    def close(self) -> None: ...


#: The old name of the scoring part of :class:`LanguageModel`.
Scorer = LanguageModel


def load_model(path: str | Path, settings: EngineSettings, *, name: str | None = None, backend: str | None = None,
               embeddings: bool = False) -> LanguageModel:
    """Load a model with the named backend (default llama.cpp); see ``engine/backends.py``."""
    from .backends import get_backend

    return get_backend(backend).load(path, settings, name=name, embeddings=embeddings)


def library_keys(model: LanguageModel, role: str | None = None) -> dict[str, Any]:
    """What computes ``model``'s numbers, as metadata and resume-guard keys:
    llama.cpp's version under the key every earlier output has
    (``llama_cpp_python``, so those still resume), another backend's versions
    and device under ``ROLE.backend`` (so the guard refuses to mix backends)."""
    from .backends import DEFAULT_BACKEND

    d = model.describe()
    if d["backend"] == DEFAULT_BACKEND:
        return dict(d["numerics"])
    return {f"{role}.backend" if role else "backend": {"backend": d["backend"], **d["numerics"]}}
