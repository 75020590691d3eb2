"""A dataset card for every output: ``OUT.card.md``, in Hugging Face's dataset-card format.

Labels made by models carry those models' terms: a dataset built with the
default pair inherits the Gemma terms of its weak model.  The card says which
models made the labels (name, sha256, source, licence, with restrictive terms
named), with which rule, settings and counts, so whoever receives the data
knows what it is without the sidecar.  It is written at the end of every run
(and of an interrupted one) next to the output, never over a file cdr-local did
not write (a card starts with :data:`MARKER`), never as a bare ``README.md``.
``datasets.load_dataset("json", data_files="OUT.jsonl")`` is unaffected.
Pure functions over the metadata, stdlib only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKER = "# dataset card written by cdr-local; it is rewritten by every run of this output"

#: licences known to carry terms beyond attribution: (HF license fields, what the card says)
RESTRICTIVE = {
    "gemma": ({"license": "other", "license_name": "gemma", "license_link": "https://ai.google.dev/gemma/terms"},
              "Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy. The terms "
              "cover Model Derivatives, which they define to include models trained on Gemma's outputs: a model "
              "trained on these labels may fall under them."),
    "llama": ({"license": "other", "license_name": "llama", "license_link": "https://www.llama.com/license/"},
              "a Llama Community License, with its use restrictions and attribution and naming requirements."),
}
PERMISSIVE = {"apache-2.0": "apache-2.0", "mit": "mit", "bsd-3-clause": "bsd-3-clause", "cc-by-4.0": "cc-by-4.0"}


def card_path(output: str) -> Path:
    p = Path(output)
    return p.with_name(p.name[: -len(".jsonl")] + ".card.md") if p.name.endswith(".jsonl") else Path(output + ".card.md")


def ours(path: Path) -> bool:
    """Whether ``path`` is missing or a card cdr-local wrote (so it may be rewritten)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(len(MARKER) + 8)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return MARKER in head


def _licence(name: str | None) -> tuple[str, dict[str, str], str | None]:
    """(the licence as given, HF front-matter fields, a restriction note or None)."""
    if not name:
        return "not stated in models.toml", {"license": "unknown"}, None
    key = name.strip().lower()
    for k, (fields, note) in RESTRICTIVE.items():
        if key.startswith(k):
            return name, fields, note
    return name, {"license": PERMISSIVE.get(key, "other")}, None


def _size(n: int) -> str:
    for lim, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return label
    return "n>1M"


def render(meta: dict[str, Any], output: str, records: int) -> str:
    """The card's text, from an output's metadata sidecar contents."""
    models = meta.get("models") or {}
    rows, fields, notes = [], [], []
    for role in ("strong", "weak"):
        m = models.get(role)
        if not isinstance(m, dict):
            continue
        lic, f, note = _licence(m.get("license"))
        fields.append(f)
        if note:
            notes.append(f"- {role} model {m.get('model')}: {note}")
        system = (m.get("system") or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {role} | {m.get('model')} | `{m.get('sha256')}` | {m.get('source')} | {lic} | {system or '-'} |")
    restrictive = next((f for f in fields if f.get("license") == "other" and "license_name" in f), None)
    front = restrictive or (fields[0] if fields and all(f == fields[0] for f in fields) else {"license": "other"} if fields else {"license": "unknown"})
    rule = meta.get("rule") or {}
    conf = meta.get("confidence") or {}
    counts = meta.get("counts") or {}
    name = Path(output).name
    lines = [
        "---",
        MARKER,
        *(f"{k}: {v}" for k, v in front.items()),
        f"pretty_name: {name}",
        "tags:",
        "- preference",
        "- dpo",
        "- reward-modeling",
        "- cdr-local",
        f"size_categories:\n- {_size(records)}",
        "configs:",
        "- config_name: default",
        f"  data_files: {name}",
        "---",
        "",
        f"# {name}",
        "",
        f"Preference labels written by cdr-local {meta.get('version', '')} (`cdr {meta.get('command', '?')}`), "
        f"{records} records. Each label comes from a customized density ratio of two local models "
        "(CDR, arXiv 2411.02481) read by a scoring rule; `confidence` is the probability that a label is right "
        "and `margin` its log-odds (TRL's margin column).",
        "",
        "## Models",
        "",
        "| side | model | sha256 | source | licence | system prompt |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "## Licences",
        "",
        *(["These labels were made with models under restrictive terms:", "", *notes] if notes else
          ["No model of this run is known to carry terms beyond its licence above; check each licence before use."]),
        "The texts being labelled keep their own sources' terms.",
        "",
        "## How the labels were made",
        "",
        f"- pair: {meta.get('pair', '-')}; rule: `{rule.get('label', '-')}` ({rule.get('summary', '')})",
        f"- confidence: {conf.get('model', '-')}; calibration: {conf.get('calibration') or 'none'}",
        f"- profile: {(meta.get('profile') or {}).get('name', '-')}; router: {meta.get('router', '-')}",
        f"- engine: {meta.get('engine', {})}; llama-cpp-python {meta.get('llama_cpp_python', '-')}",
        f"- abstention: {meta.get('abstain') or 'none'}",
        f"- input: `{meta.get('input', '-')}` (sha256 `{meta.get('input_sha256', '-')}`)",
        "",
        "## Counts (last run)",
        "",
        *(f"- {k.replace('_', ' ')}: {v}" for k, v in counts.items()),
        f"- status: {meta.get('status', '-')}",
        "",
        f"Everything else (settings that change scores, per-side template hashes) is in `{name}.meta.json`.",
        "",
    ]
    return "\n".join(lines)
