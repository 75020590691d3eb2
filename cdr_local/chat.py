"""Chat messages and chat templates.

Each model formats a conversation with the chat template its GGUF carries
(``tokenizer.chat_template``); a model without one falls back to a template
named in models.toml (a built-in name below, or inline Jinja).  Templates from
GGUF files are untrusted code, so they are rendered in Jinja's immutable
sandbox.

To score a response we need to know exactly which characters of the rendered
conversation are the response.  :func:`split_template` renders the
conversation with a sentinel in place of the assistant's answer and splits
there: ``prefix`` is everything the model reads before the answer (the
"prompt"), ``suffix`` is what the template puts after it (for ChatML:
``<|im_end|>\\n``), whose end-of-turn token is scored too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import CdrError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma has no system role: the system text is prepended to the first user turn,
# as Google's own template does.
GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(sys='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] | trim + '\\n\\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# For base models with no chat format: a plain transcript, answer ended by EOS.
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "gemma": GEMMA,
    "zephyr": ZEPHYR,
    "plain": PLAIN,
}

# The sentinel must survive `trim` and never occur in real text.
_SENTINEL = "\u2063CDR\u2063RESPONSE\u2063"


class TemplateError(CdrError):
    """A chat template failed to render (bad, hostile, or unsupported)."""


def resolve_template(gguf_template: str | None, fallback: str | None, model_name: str) -> str:
    """The template text to use: the GGUF's own, else the registry's fallback."""
    if gguf_template:
        return gguf_template
    if fallback:
        return BUILTIN_TEMPLATES.get(fallback, fallback)
    raise TemplateError(
        f"model {model_name!r}: its GGUF has no chat template and models.toml names none; "
        f"add chat_template = one of {', '.join(BUILTIN_TEMPLATES)} (or inline Jinja)"
    )


# Bounds on what one render of an (untrusted) template may cost.  Jinja's
# sandbox blocks unsafe attributes and caps a single range() at 100000 items,
# but nested loops, ``10**(10**10)`` or ``'x' * 10**10`` would still hang or
# exhaust memory.  (Memory can still be grown by repeated concatenation.)
MAX_TEMPLATE_STEPS = 1_000_000  # template source lines executed per render (~1 s)
MAX_TEMPLATE_VALUE = 10_000_000  # items/characters from one `*`; (bits / 4) from one `**`


class _StepBudget:
    """A trace function that counts the lines template code executes."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:
        # Only frames of compiled template code are traced line by line.
        return self._local if frame.f_code.co_filename == "<template>" else None

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.left -= 1
            if self.left < 0:
                raise TemplateError(
                    f"chat template ran too long (over {MAX_TEMPLATE_STEPS} steps)"
                )
        return self._local


def _checked_binop(operator: str, left: Any, right: Any) -> Any:
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * abs(left).bit_length() > 4 * MAX_TEMPLATE_VALUE:
                raise TemplateError("chat template computes a power too large")
        return left**right
    # operator == "*"
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
            raise TemplateError("chat template builds a sequence too large")
    return left * right


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _checked_binop(operator, left, right)

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat template raised: {message}")

    def strftime_now(fmt: str) -> str:
        # Fixed date: scores must not depend on the day a run happens.
        import datetime

        return datetime.datetime(2024, 1, 1).strftime(fmt)

    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def render(
    template: str,
    messages: list[Message] | tuple[Message, ...],
    *,
    add_generation_prompt: bool,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render ``messages`` with a (sandboxed) chat template."""
    from jinja2.exceptions import SecurityError

    tpl = _compile(template)
    previous_trace = sys.gettrace()
    sys.settrace(_StepBudget(MAX_TEMPLATE_STEPS))
    try:
        return str(
            tpl.render(
                messages=[m.to_dict() for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        )
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from None
    except Exception as e:  # Jinja errors, and OverflowError, ZeroDivisionError, MemoryError, ...
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous_trace)


@dataclass(frozen=True)
class TemplateSplit:
    prefix: str  # what the model reads before the answer
    suffix: str  # what the template writes after the answer (end-of-turn etc.)


def split_template(
    template: str,
    messages: list[Message] | tuple[Message, ...],
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> TemplateSplit:
    """Split the rendered conversation around the assistant answer.

    Rendering with a sentinel answer (instead of rendering the prompt with
    ``add_generation_prompt`` and diffing) gives the exact text the template
    wraps around an answer, including templates whose generation prompt
    differs from a finished turn.
    """
    full = render(
        template,
        [*messages, Message("assistant", _SENTINEL)],
        add_generation_prompt=False,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    at = full.find(_SENTINEL)
    if at < 0 or full.find(_SENTINEL, at + 1) >= 0:
        raise TemplateError("chat template does not place the assistant answer verbatim exactly once")
    return TemplateSplit(prefix=full[:at], suffix=full[at + len(_SENTINEL) :])
