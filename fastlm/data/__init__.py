"""fastlm's bundled demo data set: event sentence -> one-line JSON record.

Each record has ``instruction``, ``input`` and ``output`` plus a chat ``messages`` list::

    >>> from fastlm.data import load_demo_dataset, demo_prompts, format_check
    >>> rec = load_demo_dataset("train")[0]
    >>> rec["messages"][0]["role"], rec["messages"][1]["role"]
    ('user', 'assistant')
    >>> format_check(rec["output"])
    True

Plain Python, no ``datasets`` dependency; wrap with ``datasets.Dataset.from_list`` if wanted.
See ``README.md`` next to this file for how the data was made and its licence.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = [
    "EVENT_KEYS",
    "demo_prompts",
    "format_check",
    "load_demo_dataset",
    "parse_event",
    "user_prompt",
]

EVENT_KEYS = ("who", "what", "where", "when")
_FILES = {"train": "demo_instructions.jsonl", "eval": "demo_eval.jsonl"}
_SPLIT_ALIASES = {"test": "eval", "validation": "eval"}


def _read_jsonl(name: str) -> list[dict[str, Any]]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def user_prompt(instruction: str, input: str) -> str:
    """The user turn for a record: the instruction, a blank line, then the sentence."""
    return f"{instruction}\n\n{input}" if input else instruction


def load_demo_dataset(split: str = "train") -> list[dict[str, Any]]:
    """Load a split ("train": 480 records, "eval": 12 held-out records).

    Every record is a fresh dict with keys ``instruction``, ``input``, ``output`` and
    ``messages`` (``[{"role": "user", ...}, {"role": "assistant", ...}]``).
    """
    key = _SPLIT_ALIASES.get(split, split)
    if key not in _FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
    records = []
    for rec in _read_jsonl(_FILES[key]):
        prompt = user_prompt(rec["instruction"], rec["input"])
        records.append(
            {
                **rec,
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": rec["output"]},
                ],
            }
        )
    return records


def demo_prompts() -> list[str]:
    """Held-out user prompts (none of their sentences occurs in the train split)."""
    return [rec["messages"][0]["content"] for rec in load_demo_dataset("eval")]


def parse_event(output: str) -> dict[str, str] | None:
    """Parse a generation as an event record; None if it does not follow the format.

    The format: after stripping surrounding whitespace, a single line that is a JSON object
    with exactly the keys who, what, where, when, each a non-empty string.  Markdown code
    fences, extra prose, multi-line JSON and other keys all fail.
    """
    text = output.strip()
    if not text.startswith("{") or "\n" in text:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or set(obj) != set(EVENT_KEYS):
        return None
    if not all(isinstance(v, str) and v.strip() for v in obj.values()):
        return None
    return obj


def format_check(output: str) -> bool:
    """True if ``output`` is a one-line JSON object with exactly the four event keys."""
    return parse_event(output) is not None
