"""Data files in the common formats: detection, checks that name file and line, TRL rows."""

from __future__ import annotations

import json

import pytest

from fastlm.data.formats import (
    DataFormatError,
    detect_format,
    instruction_prompt,
    load_data,
    read_records,
    sft_rows,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
    ]
}
ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
PROMPT_COMPLETION = {"prompt": "2 + 2 =", "completion": " 4"}
TEXT = {"text": "A document."}


def jsonl(path, *records, raw: str | None = None):
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (raw or ""), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "record, name",
    [
        (CHAT, "chat"),
        (SHAREGPT, "sharegpt"),
        (ALPACA, "instruction"),
        (PROMPT_COMPLETION, "prompt_completion"),
        (TEXT, "text"),
        ({"foo": 1}, None),
        ({"prompt": "x"}, None),  # a prompt alone is no format
    ],
)
def test_detect_format(record, name):
    assert detect_format(record) == name


@pytest.mark.parametrize("record, name", [(CHAT, "chat"), (ALPACA, "instruction"), (TEXT, "text")])
def test_load_detects_and_counts(tmp_path, record, name):
    data = load_data(jsonl(tmp_path / "d.jsonl", record, record, record))
    assert data.format == name and len(data) == 3
    assert data.locations == [f"{tmp_path / 'd.jsonl'}:{n}" for n in (1, 2, 3)]


def test_sharegpt_becomes_messages(tmp_path):
    data = load_data(jsonl(tmp_path / "s.jsonl", SHAREGPT))
    assert data.format == "sharegpt"
    assert data.records[0]["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_malformed_line_is_named_with_its_number(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", TEXT, TEXT, raw='\n{"text": "unterminated}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:4: malformed JSON .*column"):
        load_data(path)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"instruction": "x"}, r':2: missing the "output" field'),
        ({"instruction": "x", "output": 3}, r':2: "output" must be a string, got int'),
        ({"messages": []}, r":2: \"messages\" must be a non-empty list"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            r":2: messages\[0\]: role must be one of",
        ),
        (
            {"messages": [{"role": "user", "content": ["x"]}]},
            r":2: messages\[0\]: content must be a string",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, ":2: the conversation has no assistant"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, record, match):
    first = ALPACA if "instruction" in record else CHAT
    with pytest.raises(DataFormatError, match=match):
        load_data(jsonl(tmp_path / "d.jsonl", first, record))


def test_sharegpt_unknown_speaker(tmp_path):
    bad = {"conversations": [{"from": "narrator", "value": "x"}]}
    with pytest.raises(DataFormatError, match=r":1: conversations\[0\]: unknown speaker"):
        load_data(jsonl(tmp_path / "d.jsonl", bad))


def test_unknown_keys_show_the_formats(tmp_path):
    with pytest.raises(DataFormatError, match=r"d\.jsonl:1: cannot tell.*\['question'\]") as info:
        load_data(jsonl(tmp_path / "d.jsonl", {"question": "x"}))
    for shape in ("messages", "conversations", "instruction", "completion", "text"):
        assert shape in str(info.value)


def test_mixed_formats_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match=r":2: this record is in the text format.*:1 is chat"):
        load_data(jsonl(tmp_path / "d.jsonl", CHAT, TEXT))


def test_non_object_line_and_empty_file(tmp_path):
    with pytest.raises(DataFormatError, match=r":1: expected a JSON object per line, got list"):
        load_data(jsonl(tmp_path / "d.jsonl", raw="[1, 2]\n"))
    with pytest.raises(DataFormatError, match="no records"):
        load_data(jsonl(tmp_path / "e.jsonl", raw="\n\n"))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_data(path)


def test_bom_blank_lines_and_max_samples(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + json.dumps(TEXT) + "\n\n   \n" + json.dumps(TEXT) + "\n" * 3)
    assert len(load_data(path)) == 2
    assert len(load_data(path, max_samples=1)) == 1


def test_json_list_and_wrapper(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([ALPACA, ALPACA]))
    assert load_data(listed).format == "instruction"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [TEXT]}))
    assert load_data(wrapped).format == "text"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ALPACA, {"instruction": "x"}]))
    with pytest.raises(DataFormatError, match=r"bad\.json: record 1: missing the \"output\""):
        load_data(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataFormatError, match=r"broken\.json:3: malformed JSON"):
        load_data(broken)


def test_folder_reads_every_data_file_in_order(tmp_path):
    jsonl(tmp_path / "b.jsonl", TEXT)
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "c.jsonl", TEXT, TEXT)
    (tmp_path / "a.json").write_text(json.dumps([TEXT]))
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    jsonl(tmp_path / ".hidden" / "x.jsonl", raw="not json\n")
    data = load_data(tmp_path)
    assert [p.name for p in data.files] == ["a.json", "b.jsonl", "c.jsonl"]
    assert len(data) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="no .jsonl or .json files"):
        load_data(empty)


def test_missing_path_and_wrong_suffix(tmp_path):
    with pytest.raises(DataFormatError, match="no such file or folder"):
        load_data(tmp_path / "nope.jsonl")
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(DataFormatError, match=r"not a \.jsonl or \.json file"):
        load_data(csv)


def test_forced_format_checks_its_fields(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "x", "prompt": "p"})
    assert load_data(path, format="text").records == [{"text": "x"}]
    with pytest.raises(DataFormatError, match=r':1: missing the "completion" field'):
        load_data(path, format="prompt_completion")
    with pytest.raises(DataFormatError, match="unknown data format"):
        load_data(path, format="csv")


# --------------------------------------------------------------------------- rows for TRL


def test_chat_rows_split_off_the_last_answer(tmp_path):
    data = load_data(jsonl(tmp_path / "d.jsonl", CHAT))
    (row,) = sft_rows(data, has_chat_template=True)
    assert row == {"prompt": CHAT["messages"][:2], "completion": CHAT["messages"][2:]}
    (row,) = sft_rows(data, has_chat_template=True, train_on="all")
    assert row == {"messages": CHAT["messages"]}


def test_chat_needs_a_template_and_a_final_answer(tmp_path):
    data = load_data(jsonl(tmp_path / "d.jsonl", CHAT))
    with pytest.raises(DataFormatError, match="no chat template"):
        sft_rows(data, has_chat_template=False)
    open_ended = {"messages": CHAT["messages"] + [{"role": "user", "content": "More?"}]}
    data = load_data(jsonl(tmp_path / "e.jsonl", CHAT, open_ended))
    with pytest.raises(DataFormatError, match=r"e\.jsonl:2: the conversation ends with a user"):
        sft_rows(data, has_chat_template=True)
    assert len(sft_rows(data, has_chat_template=True, train_on="all")) == 2


def test_instruction_rows_with_and_without_a_chat_template(tmp_path):
    with_system = dict(ALPACA, system="You translate.")
    no_input = {"instruction": "Say hi.", "output": "hi"}
    data = load_data(jsonl(tmp_path / "d.jsonl", with_system, no_input))
    chat = sft_rows(data, has_chat_template=True)
    assert chat[0]["prompt"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate to French.\n\ncat"},
    ]
    assert chat[0]["completion"] == [{"role": "assistant", "content": "chat"}]
    assert chat[1]["prompt"] == [{"role": "user", "content": "Say hi."}]
    plain = sft_rows(data, has_chat_template=False)
    assert plain[0] == {
        "prompt": "You translate.\n\n### Instruction:\nTranslate to French.\n\n"
        "### Input:\ncat\n\n### Response:\n",
        "completion": "chat",
    }
    assert plain[1]["prompt"] == instruction_prompt(data.records[1])
    assert "### Input" not in plain[1]["prompt"]


def test_dolly_field_names(tmp_path):
    dolly = {"instruction": "Sum.", "context": "1 1", "response": "2"}
    (record,) = load_data(jsonl(tmp_path / "d.jsonl", dolly)).records
    assert (record["input"], record["output"]) == ("1 1", "2")


def test_prompt_completion_and_text_pass_through(tmp_path):
    conversational = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
    }
    data = load_data(jsonl(tmp_path / "c.jsonl", conversational))
    assert sft_rows(data, has_chat_template=True) == [conversational]
    with pytest.raises(DataFormatError, match="no chat template"):
        sft_rows(data, has_chat_template=False)
    for record in (PROMPT_COMPLETION, TEXT):
        data = load_data(jsonl(tmp_path / "p.jsonl", record))
        assert sft_rows(data, has_chat_template=False) == [record]


def test_read_records_keeps_line_numbers(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", raw='\n{"text": "a"}\n\n{"text": "b"}\n')
    assert [where for _, where in read_records(path)] == [f"{path}:2", f"{path}:4"]


def test_trl_masks_everything_but_the_answer(tmp_path):
    """The rows go through TRL's own tokenisation: the loss covers exactly the answer (+ end)."""
    from datasets import Dataset
    from tiny_models import save_tiny_model, tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    from fastlm import FastModel

    path = save_tiny_model("llama", tmp_path / "llama")
    model, tokenizer = FastModel.from_pretrained(str(path), max_seq_length=64, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=4)
    data = load_data(jsonl(tmp_path / "d.jsonl", CHAT))
    rows = sft_rows(data, has_chat_template=True)
    args = SFTConfig(
        output_dir=str(tmp_path / "o"),
        use_cpu=True,
        report_to=[],
        max_length=64,
        gradient_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([example])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    answer = [i for i, label in zip(ids, labels) if label != -100]
    encode = tiny_tokenizer()  # the template ends each turn with a newline
    assert answer == encode("Hello!\n", add_special_tokens=False).input_ids
    prompt = encode("system: Be brief.\nuser: Hi\nassistant: ", add_special_tokens=False)
    assert ids[: len(ids) - len(answer)] == prompt.input_ids
