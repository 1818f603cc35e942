"""The bundled demo data set: counts, format, held-out split, deterministic regeneration."""

import json
from importlib import resources

import pytest

from fastlm.data import (
    EVENT_KEYS,
    demo_prompts,
    format_check,
    load_demo_dataset,
    make_demo_data,
    parse_event,
    user_prompt,
)


def test_counts():
    assert len(load_demo_dataset()) == make_demo_data.N_TRAIN == 480
    assert len(load_demo_dataset("train")) == 480
    assert len(load_demo_dataset("eval")) == make_demo_data.N_EVAL == 12
    assert len(demo_prompts()) == 12
    with pytest.raises(ValueError):
        load_demo_dataset("nope")


def test_record_shape():
    for split in ("train", "eval"):
        for rec in load_demo_dataset(split):
            assert set(rec) == {"instruction", "input", "output", "messages"}
            user, assistant = rec["messages"]
            assert user == {
                "role": "user",
                "content": user_prompt(rec["instruction"], rec["input"]),
            }
            assert assistant == {"role": "assistant", "content": rec["output"]}


def test_every_output_passes_format_check():
    for split in ("train", "eval"):
        for rec in load_demo_dataset(split):
            assert format_check(rec["output"]), rec
            event = parse_event(rec["output"])
            # who / what / where are copied verbatim from the sentence
            for key in ("who", "what", "where"):
                assert event[key] in rec["input"], (key, rec)


def test_format_check_rejects_other_shapes():
    good = (
        '{"who": "Maria", "what": "meeting the dentist", "where": "Lisbon", "when": "Friday 3 pm"}'
    )
    assert format_check(good)
    assert format_check("  " + good + "\n")
    assert not format_check("")
    assert not format_check("Maria is meeting the dentist in Lisbon on Friday at 3 pm.")
    assert not format_check("```json\n" + good + "\n```")
    assert not format_check(json.dumps(json.loads(good), indent=2))  # multi-line
    assert not format_check(good + " Hope this helps!")
    assert not format_check('{"who": "Maria", "what": "x", "where": "Lisbon"}')  # missing key
    assert not format_check(good[:-1] + ', "why": "pain"}')  # extra key
    assert not format_check(good.replace('"Lisbon"', '""'))  # empty value
    assert not format_check(good.replace('"Lisbon"', "42"))  # not a string
    assert not format_check("[" + good + "]")


def test_eval_prompts_not_in_train():
    train = load_demo_dataset("train")
    train_inputs = {rec["input"] for rec in train}
    train_prompts = {rec["messages"][0]["content"] for rec in train}
    evals = load_demo_dataset("eval")
    assert len({rec["input"] for rec in evals}) == len(evals)
    for rec, prompt in zip(evals, demo_prompts()):
        assert rec["input"] not in train_inputs
        assert prompt not in train_prompts
        assert rec["input"] in prompt
    # each held-out prompt also has a name, activity or place that never occurs in training
    held_out = (
        make_demo_data.PEOPLE_EVAL
        + make_demo_data.ACTIVITIES_EVAL
        + [p for _, p in make_demo_data.PLACES_EVAL]
    )
    train_text = "\n".join(train_inputs)
    assert not any(h in train_text for h in held_out)
    for rec in evals:
        assert any(h in rec["input"] for h in held_out), rec


def test_train_is_varied():
    train = load_demo_dataset("train")
    assert len({rec["input"] for rec in train}) == len(train)
    events = [parse_event(rec["output"]) for rec in train]
    for key in EVENT_KEYS:
        assert len({e[key] for e in events}) >= 20, key
    assert len({rec["instruction"] for rec in train}) >= 3


def test_files_small():
    pkg = resources.files("fastlm.data")
    for name in (make_demo_data.TRAIN_FILE, make_demo_data.EVAL_FILE):
        assert len(pkg.joinpath(name).read_bytes()) < 200_000


def test_regeneration_is_identical(tmp_path):
    make_demo_data.write(tmp_path)
    pkg = resources.files("fastlm.data")
    for name in (make_demo_data.TRAIN_FILE, make_demo_data.EVAL_FILE):
        assert (tmp_path / name).read_bytes() == pkg.joinpath(name).read_bytes(), name
    # and a second run agrees with the first
    again = tmp_path / "again"
    make_demo_data.main(["--out-dir", str(again)])
    for name in (make_demo_data.TRAIN_FILE, make_demo_data.EVAL_FILE):
        assert (again / name).read_bytes() == (tmp_path / name).read_bytes(), name
