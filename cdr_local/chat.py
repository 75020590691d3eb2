"""Chat messages and chat templates.

Each model formats a conversation with the chat template its GGUF carries
(``tokenizer.chat_template``); a model without one falls back to a template
named in models.toml (a built-in name below, or inline Jinja).  Templates from
GGUF files (and inline ones in a shared models.toml) are untrusted code, so they
are rendered in Jinja's immutable sandbox, within the limits of :mod:`sandbox`
(a hostile template fails fast with a one-line :class:`TemplateError`).

To score a response we need to know exactly which characters of the rendered
conversation are the response.  :func:`split_template` renders the
conversation with a sentinel in place of the assistant's answer and splits
there: ``prefix`` is everything the model reads before the answer (the
"prompt"), ``suffix`` is what the template puts after it (for ChatML:
``<|im_end|>\\n``), whose end-of-turn token is scored too.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sandbox import (  # noqa: F401  (re-exported: the sandbox's limits and errors belong to chat templates)
    MAX_TEMPLATE_ALLOCATION,
    MAX_TEMPLATE_DEPTH,
    MAX_TEMPLATE_INT_BITS,
    MAX_TEMPLATE_OUTPUT,
    MAX_TEMPLATE_SECONDS,
    MAX_TEMPLATE_SOURCE,
    MAX_TEMPLATE_STEPS,
    MAX_TEMPLATE_STRING,
    MAX_TEMPLATE_WEIGHT,
    MAX_TEMPLATE_WIDTH,
    TemplateError,
    _compile,
    render,
)

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


def resolve_template(gguf_template: str | None, fallback: str | None, model_name: str, *, override: str | None = None) -> str:
    """The template text to use: a pair side's own (``override``), else the GGUF's,
    else the registry's fallback; built-in names are expanded."""
    if override:
        return BUILTIN_TEMPLATES.get(override, override)
    if gguf_template:
        return gguf_template
    if fallback:
        return BUILTIN_TEMPLATES.get(fallback, fallback)
    raise TemplateError(
        f"model {model_name!r}: its GGUF has no chat template and models.toml names none; "
        f"add chat_template = one of {', '.join(BUILTIN_TEMPLATES)} (or inline Jinja)"
    )


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
