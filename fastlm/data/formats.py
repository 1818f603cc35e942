"""Training data in the common formats: read, check, detect, and convert for TRL's SFTTrainer.

A data set is a ``.jsonl`` file (one JSON object a line), a ``.json`` file (a list of objects) or a
folder of such files. Every record of a data set has the same format:

==================  ===========================================================================
chat                ``{"messages": [{"role": "user", "content": "..."}, ...]}``
sharegpt            ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
instruction         ``{"instruction": "...", "input": "...", "output": "..."}`` (Alpaca; ``input``
                    and ``system`` are optional; Dolly's ``context`` / ``response`` also work)
prompt_completion   ``{"prompt": "...", "completion": "..."}``
text                ``{"text": "..."}``
==================  ===========================================================================

Usage::

    data = load_data("train.jsonl")                 # DataFormatError names file and line
    rows = sft_rows(data, has_chat_template=True)   # list of dicts for datasets.Dataset
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlm.errors import FastLMError

FORMATS = ("chat", "sharegpt", "instruction", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function_response": "tool",
}
TRAIN_ON = ("completion", "all")
# Used for instruction data when the tokenizer has no chat template.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n"
INPUT_TEMPLATE = "### Input:\n{input}\n\n"
RESPONSE_HEADER = "### Response:\n"
_SUFFIXES = (".jsonl", ".json")
_EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]}',
    "sharegpt": '{"conversations": [{"from": "human", "value": "Hi"}, '
    '{"from": "gpt", "value": "Hello!"}]}',
    "instruction": '{"instruction": "Translate to French.", "input": "cat", "output": "chat"}',
    "prompt_completion": '{"prompt": "2 + 2 =", "completion": " 4"}',
    "text": '{"text": "Any document text."}',
}


class DataFormatError(FastLMError, ValueError):
    """A data file cannot be read as training data; the message names the file and line."""


@dataclass
class TrainingData:
    """Records in one canonical shape per format, and where each one came from.

    ``chat`` and ``sharegpt`` records become ``{"messages": [...]}``; ``instruction`` records
    ``{"instruction", "input", "output", "system"}``; the others keep their one or two fields.
    """

    format: str
    records: list[dict[str, Any]] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)  # "file:line" or "file: record N"
    files: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


# --------------------------------------------------------------------------- reading


def data_files(path: str | os.PathLike) -> list[Path]:
    """The ``.jsonl`` / ``.json`` files of ``path`` (itself, or a folder searched recursively)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in _SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataFormatError(f"{path}: the folder has no .jsonl or .json files")
        return files
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or folder")
    if path.suffix.lower() not in _SUFFIXES:
        raise DataFormatError(
            f"{path}: not a .jsonl or .json file (one JSON object a line, or a list of objects)"
        )
    return [path]


def read_records(path: str | os.PathLike) -> list[tuple[dict[str, Any], str]]:
    """Every JSON object of one file with its location (``"file:line"``), blank lines skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataFormatError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None
    if path.suffix.lower() == ".json" or (path.suffix.lower() != ".jsonl" and _is_json(text)):
        return _read_json(path, text)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(
                f"{path}:{number}: malformed JSON ({error.msg} at column {error.colno}): "
                f"{_clip(line)}"
            ) from None
        if not isinstance(value, dict):
            raise DataFormatError(
                f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}"
            )
        records.append((value, f"{path}:{number}"))
    return records


def _is_json(text: str) -> bool:
    return text.lstrip().startswith("[")


def _read_json(path: Path, text: str) -> list[tuple[dict[str, Any], str]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        hint = ""
        if text.lstrip().startswith("{"):
            hint = " (one object a line? name the file .jsonl)"
        raise DataFormatError(
            f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno}){hint}"
        ) from None
    if isinstance(value, dict):  # {"data": [...]}-style wrappers with a single list inside
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else value
    if not isinstance(value, list):
        raise DataFormatError(f"{path}: a .json data file must hold a list of objects")
    records = []
    for index, item in enumerate(value):
        where = f"{path}: record {index}"
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
        records.append((item, where))
    return records


# --------------------------------------------------------------------------- detection + checks


def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record's keys point to, or None. Usage: ``detect_format({"text": "hi"})``."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def load_data(
    path: str | os.PathLike, format: str = "auto", max_samples: int | None = None
) -> TrainingData:
    """Read and check a data file or folder; every record must have the same format.

    Usage: ``data = load_data("train.jsonl")``; ``data.format`` is the detected format.
    Raises DataFormatError naming the file and line of the first bad record.
    """
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(f"unknown data format {format!r}; use auto or one of {FORMATS}")
    files = data_files(path)
    data = TrainingData(format=format, files=files)
    first_where = None
    for file in files:
        for record, where in read_records(file):
            found = detect_format(record)
            if data.format == "auto":
                if found is None:
                    raise DataFormatError(_undetected(record, where))
                data.format, first_where = found, where
            elif found is not None and found != data.format and format == "auto":
                raise DataFormatError(
                    f"{where}: this record is in the {found} format, but "
                    f"{first_where} is {data.format}; one data set, one format"
                )
            data.records.append(_CANONICAL[data.format](record, where))
            data.locations.append(where)
            if max_samples is not None and len(data.records) >= max_samples:
                return data
    if not data.records:
        raise DataFormatError(f"{path}: no records (the file(s) are empty)")
    return data


def _undetected(record: dict, where: str) -> str:
    examples = "\n".join(f"  {name:<18} {line}" for name, line in _EXAMPLES.items())
    return (
        f"{where}: cannot tell the data format from the keys {sorted(record)}. "
        f"Each record needs one of these shapes:\n{examples}"
    )


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise DataFormatError(f'{where}: missing the "{key}" field (keys: {sorted(record)})')
    if not isinstance(value, str):
        raise DataFormatError(
            f'{where}: "{key}" must be a string, got {type(value).__name__}: {_clip(value)}'
        )
    return value


def _check_messages(
    messages: Any, where: str, key: str = "messages", need_assistant: bool = True
) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f'{where}: "{key}" must be a non-empty list of messages')
    out = []
    for turn, message in enumerate(messages):
        at = f"{where}: {key}[{turn}]"
        if not isinstance(message, dict):
            raise DataFormatError(f"{at} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise DataFormatError(f"{at}: role must be one of {ROLES}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataFormatError(
                f"{at}: content must be a string, got {type(content).__name__}: {_clip(content)}"
            )
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataFormatError(f"{where}: the conversation has no assistant message to learn from")
    return out


def _chat(record: dict, where: str) -> dict:
    return {"messages": _check_messages(record.get("messages"), where)}


def _sharegpt(record: dict, where: str) -> dict:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f'{where}: "conversations" must be a non-empty list of turns')
    messages = []
    for index, turn in enumerate(turns):
        at = f"{where}: conversations[{index}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataFormatError(f'{at} must be an object with "from" and "value"')
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataFormatError(
                f"{at}: unknown speaker {turn['from']!r}; use one of {sorted(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": _check_messages(messages, where, "conversations")}


def _instruction(record: dict, where: str) -> dict:
    fields = dict(record)
    if "input" not in fields and "context" in fields:  # Dolly
        fields["input"] = fields["context"]
    if "output" not in fields and "response" in fields:
        fields["output"] = fields["response"]
    return {
        "instruction": _text(fields, "instruction", where),
        "input": _text(fields, "input", where, optional=True),
        "output": _text(fields, "output", where),
        "system": _text(fields, "system", where, optional=True),
    }


def _prompt_completion(record: dict, where: str) -> dict:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # TRL's conversational form
        return {
            "prompt": _check_messages(prompt, where, "prompt", need_assistant=False),
            "completion": _check_messages(completion, where, "completion"),
        }
    return {
        "prompt": _text(record, "prompt", where),
        "completion": _text(record, "completion", where),
    }


def _plain_text(record: dict, where: str) -> dict:
    text = _text(record, "text", where)
    if not text.strip():
        raise DataFormatError(f'{where}: "text" is empty')
    return {"text": text}


_CANONICAL = {
    "chat": _chat,
    "sharegpt": _sharegpt,
    "instruction": _instruction,
    "prompt_completion": _prompt_completion,
    "text": _plain_text,
}


# --------------------------------------------------------------------------- conversion


def user_turn(record: dict[str, str]) -> str:
    """An instruction record's user message: the instruction, a blank line, then the input."""
    if record["input"]:
        return f"{record['instruction']}\n\n{record['input']}"
    return record["instruction"]


def instruction_prompt(record: dict[str, str]) -> str:
    """An instruction record as plain text up to the response (no chat template)."""
    text = record["system"] + "\n\n" if record["system"] else ""
    text += INSTRUCTION_TEMPLATE.format(instruction=record["instruction"])
    if record["input"]:
        text += INPUT_TEMPLATE.format(input=record["input"])
    return text + RESPONSE_HEADER


def sft_rows(
    data: TrainingData, has_chat_template: bool, train_on: str = "completion"
) -> list[dict[str, Any]]:
    """Rows that TRL's SFTTrainer takes as they are (it applies the chat template itself).

    Usage: ``datasets.Dataset.from_list(sft_rows(data, tokenizer.chat_template is not None))``.
    ``train_on="completion"``: chat becomes conversational prompt/completion (the loss covers
    the last assistant message only) and instruction becomes prompt/completion (the loss covers
    the output). ``"all"``: chat stays ``messages`` (loss on every token). Set SFTConfig's
    ``completion_only_loss`` to ``train_on == "completion"``.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    needs_template = data.format in ("chat", "sharegpt") or (
        data.format == "prompt_completion" and data.records and _conversational(data.records[0])
    )
    if needs_template and not has_chat_template:
        raise DataFormatError(
            f"{data.files[0]}: the data is in the {data.format} format, but the tokenizer has "
            "no chat template to render it; pass --chat-template (a Jinja file, or 'chatml' / "
            "'gemma'), or use instruction / prompt_completion / text data"
        )
    rows = []
    for record, where in zip(data.records, data.locations):
        if data.format in ("chat", "sharegpt"):
            rows.append(_chat_row(record["messages"], where, train_on))
        elif data.format == "instruction":
            rows.append(_instruction_row(record, has_chat_template))
        else:
            rows.append(dict(record))
    return rows


def _conversational(record: dict) -> bool:
    return isinstance(record.get("prompt"), list)


def _chat_row(messages: list[dict], where: str, train_on: str) -> dict:
    if train_on == "all":
        return {"messages": messages}
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            f"{where}: the conversation ends with a {messages[-1]['role']} message; with "
            "--train-on completion the last message must be the assistant's answer "
            "(or pass --train-on all)"
        )
    if len(messages) < 2:
        raise DataFormatError(f"{where}: the conversation has no prompt before the answer")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def _instruction_row(record: dict, has_chat_template: bool) -> dict:
    if not has_chat_template:
        return {"prompt": instruction_prompt(record), "completion": record["output"]}
    prompt = [{"role": "system", "content": record["system"]}] if record["system"] else []
    prompt.append({"role": "user", "content": user_turn(record)})
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": record["output"]}]}


def _clip(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "FORMATS",
    "TRAIN_ON",
    "DataFormatError",
    "TrainingData",
    "data_files",
    "detect_format",
    "instruction_prompt",
    "load_data",
    "read_records",
    "sft_rows",
    "user_turn",
]
