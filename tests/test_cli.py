"""The ``fastlm`` command line end to end: sft -> export -> reload, on tiny models and Gemma 3 270M.

Commands run in-process through ``fastlm.cli.main(argv)`` (fast); one subprocess smoke test runs
``python -m fastlm info`` as a user would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import bpe_tokenizer, llama_cpp_server, save_tiny_model

from fastlm import cli
from fastlm.cli_config import ConfigError, apply_config, load_config_file

REPO = Path(__file__).resolve().parent.parent
NEW_COMMANDS = ("sft", "export", "bench", "info")


def sentencepiece_tokenizer():
    """A small SentencePiece-style BPE (▁ + byte fallback) that GGUF export accepts: 300 ids."""
    merges = [("▁", "a"), ("d", "d"), ("▁a", "dd"), ("u", "s"), ("e", "r")]
    tokenizer = bpe_tokenizer(merges, unk_token=None)
    assert len(tokenizer) <= 300
    return tokenizer


def chat_records(n: int = 16) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"add {i} and {i + 1}"},
                {"role": "assistant", "content": str(2 * i + 1)},
            ]
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list) -> Path:
    """One record a line: a dict as JSON, a string as written (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run(argv: list[str]) -> int:
    return cli.main([str(a) for a in argv])


pytestmark = pytest.mark.usefixtures("cli_logging")


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    """``fastlm sft`` for 3 steps on the tiny Llama: the output folder."""
    root = tmp_path_factory.mktemp("sft")
    data = write_jsonl(root / "chat.jsonl", chat_records())
    out = root / "out"
    code = run(
        ["sft", "--model", tiny_llama, "--data", data, "--output-dir", out, "--max-steps", 3]
        + ["--batch-size", 4, "--grad-accum", 1, "--lr", 1e-2, "--warmup-steps", 0]
        + ["--max-seq-length", 64, "--lora-r", 4, "--lora-alpha", 8]
    )
    assert code == 0
    return out


# --------------------------------------------------------------------------- help and parsing


@pytest.mark.parametrize("command", NEW_COMMANDS + ("demo",))
def test_help_for_every_command_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: fastlm {command}" in text
    if command in NEW_COMMANDS:
        assert "examples:" in text and f"fastlm {command} " in text.split("examples:")[1]


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in (*NEW_COMMANDS, "demo"):
        assert command in text
    assert cli.main([]) == 2


def test_help_does_not_import_torch():
    # In a fresh interpreter: this one has torch loaded by the other tests.
    code = (
        "import sys\n"
        "from fastlm import cli\n"
        "for argv in [['--help']] + [[name, '--help'] for name in cli.COMMANDS]:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (argv, exit.code)\n"
        "print('torch' in sys.modules)\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"  # --help loaded torch


def test_gguf_methods_listed_without_torch_match_the_writer():
    from fastlm.commands import GGUF_METHODS
    from fastlm.export.gguf_writer import METHODS

    assert GGUF_METHODS == METHODS


def test_shared_flags_refuse_a_change_for_a_flag_not_added():
    import argparse

    from fastlm.commands._common_args import add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, "--lora-alpha", lora_alpha={"default": 8})
    assert parser.parse_args([]).lora_alpha == 8
    with pytest.raises(TypeError, match="lora_alpah"):  # misspelt: would be dropped silently
        add_flags(argparse.ArgumentParser(), "--lora-alpha", lora_alpah={"default": 8})


def test_config_file_supplies_flags_and_flags_win(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(
        "data: train.jsonl\nlora-r: 32\nlora_alpha: 64\nlr: 0.001\n"
        "target-modules: [q_proj, v_proj]\nfull-finetune: false\ngguf: q8_0\n"
    )
    args = cli.parse_args(["sft", "--config", str(config), "--lr", "0.5"])
    assert args.data == "train.jsonl"
    assert (args.lora_r, args.lora_alpha) == (32, 64)
    assert args.lr == 0.5  # the flag wins over the file
    assert args.target_modules == ["q_proj", "v_proj"]
    assert args.gguf == ["q8_0"]  # a single value for a list flag
    assert args.batch_size == 2  # untouched default
    toml = tmp_path / "sft.toml"
    toml.write_text('data = "x.jsonl"\nmax-steps = 7\n')
    assert cli.parse_args(["sft", "--config", str(toml)]).max_steps == 7


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"lora-rank": 8}', "unknown key 'lora-rank'"),
        ('{"lora-r": "many"}', "not valid"),
        ('{"dtype": "float64"}', "not one of"),
        ('{"packing": "yes"}', "true or false"),
        ("[1, 2]", "mapping"),
        ("{not json", "cannot parse"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        apply_config(cli.build_parser().command_parsers["sft"], load_config_file(path))


def test_bad_config_file_exits_2_with_the_reason(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"lora-rank": 8}')
    assert cli.main(["sft", "--config", str(path)]) == 2
    assert "lora-rank" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def test_malformed_jsonl_line_is_named_before_any_model_loads(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    good = json.dumps(chat_records(1)[0])
    data.write_text(f"{good}\n\n{good}\n{{'messages': oops}}\n{good}\n")
    # --model does not exist: the data error must come first (data is checked before loading)
    code = run(["sft", "--model", tmp_path / "missing", "--data", data])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{data}:4: malformed JSON" in err
    assert "Traceback" not in err


def test_missing_field_names_file_and_line(tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": "d"}],
    )
    assert run(["sft", "--data", data, "--output-dir", tmp_path / "o"]) == 1
    assert f'{data}:2: missing the "output" field' in capsys.readouterr().err


def test_usage_errors_are_short(tmp_path, capsys):
    assert run(["sft"]) == 1
    assert "--data is required" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "d.jsonl", chat_records(2))
    assert run(["sft", "--data", data, "--model", tmp_path / "nowhere/x/y"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert run(["export", "--output-dir", tmp_path / "e"]) == 1
    assert "--adapter" in capsys.readouterr().err
    assert run(["export", "--adapter", tmp_path]) == 1
    assert "--output-dir is required" in capsys.readouterr().err


# --------------------------------------------------------------------------- sft -> export


def test_sft_writes_adapter_summary_and_reusable_config(trained, tiny_llama):
    adapter = trained / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    assert not (trained / "checkpoints").exists()  # no --save-steps: no empty folder left
    summary = json.loads((trained / "sft_summary.json").read_text())
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert summary["data_format"] == "chat" and summary["examples"] == 16
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert summary["trained_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["outputs"]["adapter"] == str(adapter)
    assert summary["batching"] == {"mode": "padded"}  # no --packing / --padding-free
    settings = json.loads((trained / "sft_config.json").read_text())
    assert settings["lora-r"] == 4 and settings["max-steps"] == 3
    args = cli.parse_args(["sft", "--config", str(trained / "sft_config.json")])
    assert args.lora_r == 4 and args.model == str(tiny_llama)


def test_export_merged_16bit_reloads_with_plain_transformers(trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained / "adapter"
    out = tmp_path / "merged"
    code = run(["export", "--adapter", adapter, "--method", "merged_16bit", "--dtype", "float32"])
    assert code == 1  # --output-dir missing
    capsys.readouterr()
    code = run(
        ["export", "--adapter", adapter, "--method", "merged_16bit"]
        + ["--dtype", "float32", "--output-dir", out]
    )
    assert code == 0
    assert "fastlm export: done" in capsys.readouterr().out
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), adapter
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("user: add two and three\nassistant: ", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = reference(ids).logits, merged(ids).logits
        base = reference.get_base_model()
        with reference.disable_adapter():
            untrained = base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - untrained).abs().max() > 1e-3  # the 3 training steps changed the model
    generated = merged.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 5)

    bf16 = tmp_path / "merged_bf16"  # the default: 16-bit weights
    assert run(["export", "--adapter", adapter, "--output-dir", bf16]) == 0
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_gguf_runs_in_llama_cpp(trained, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "gguf"
    code = run(
        ["export", "--adapter", trained / "adapter", "--method", "gguf"]
        + ["--quantization", "f16", "--name", "tiny", "--output-dir", out]
    )
    assert code == 0
    path = out / "tiny.f16.gguf"
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert (out / "Modelfile").read_text().startswith("FROM ./tiny.f16.gguf")
    server = llama_cpp_server(path, n_ctx=128)
    response = server.handle_completions(
        {"prompt": "add two", "n_predict": 4, "temperature": 0, "ignore_eos": True}
    )
    assert response["usage"]["completion_tokens"] == 4


def test_sft_full_finetune_on_instruction_data(tmp_path):
    from transformers import AutoModelForCausalLM

    model = save_tiny_model("gemma3_text", tmp_path / "gemma3")
    records = [{"instruction": "Double.", "input": str(i), "output": str(2 * i)} for i in range(8)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", records)
    out = tmp_path / "out"
    code = run(
        ["sft", "--model", model, "--data", data, "--output-dir", out, "--full-finetune"]
        + ["--max-steps", 2, "--batch-size", 4, "--grad-accum", 1, "--lr", 1e-3]
        + ["--eval-data", data, "--max-seq-length", 64]
    )
    assert code == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["method"] == "full" and summary["data_format"] == "instruction"
    assert summary["steps"] == 2 and math.isfinite(summary["eval_loss"])
    trained = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    changed = [
        name
        for (name, a), (_, b) in zip(trained.named_parameters(), original.named_parameters())
        if not torch.equal(a, b)
    ]
    assert changed  # every weight is trainable in a full fine-tune
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("model_type", ["gemma4_text", "qwen3_5_text"])
def test_sft_lora_on_this_years_families(tmp_path, model_type):
    """``fastlm sft --model`` on Gemma 4 and Qwen3.5 text: two LoRA steps, an adapter that plain
    PEFT loads onto the unpatched model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pytest.importorskip(f"transformers.models.{model_type.removesuffix('_text')}")
    model = save_tiny_model(model_type, tmp_path / model_type)
    records = [{"instruction": "Double.", "input": str(i), "output": str(2 * i)} for i in range(8)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", records)
    out = tmp_path / "out"
    code = run(
        ["sft", "--model", model, "--data", data, "--output-dir", out, "--max-steps", 2]
        + ["--batch-size", 4, "--grad-accum", 1, "--lr", 1e-3, "--max-seq-length", 64]
        + ["--lora-r", 4, "--lora-alpha", 8]
    )
    assert code == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 2
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out / "adapter")
    lora = [n for n, _ in loaded.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in loaded.named_parameters() if n in lora)


def test_export_failure_after_training_keeps_the_adapter(tmp_path, capsys):
    # the character tokenizer of tiny_models cannot be written as GGUF: training must survive
    model = save_tiny_model("llama", tmp_path / "llama")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"{i} and {i}"} for i in range(4)])
    out = tmp_path / "out"
    code = run(
        ["sft", "--model", model, "--data", data, "--output-dir", out, "--max-steps", 1]
        + ["--batch-size", 2, "--grad-accum", 1, "--gguf", "f16"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "training finished" in err and "fastlm export" in err
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- info and bench


def test_info_json_reports_versions_families_and_exports(capsys):
    assert cli.main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    packages = {row["package"]: row for row in report["packages"]}
    assert packages["torch"]["version"].split("+")[0] == torch.__version__.split("+")[0]
    assert packages["torch"]["status"] in ("ok", "untested")
    assert packages["torch"]["tested"].startswith(">=")
    assert {f["model_type"] for f in report["families"]} >= {"llama", "gemma3_text", "qwen3"}
    assert "gguf" not in report["export"]["save_methods"]
    assert "q8_0" in report["export"]["gguf_quantizations"]
    assert report["cuda"]["available"] == torch.cuda.is_available()


def test_python_m_fastlm_info_in_a_subprocess(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "fastlm", "info"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "supported model families" in result.stdout
    assert "transformers" in result.stdout


def test_bench_runs_the_installed_benchmark_or_a_script(capfd, tmp_path):
    from fastlm.commands.bench import MODULE, command_line

    assert cli.main(["bench", "--list-shapes"]) == 0
    assert "tiny-llama" in capfd.readouterr().out
    argv = ["bench", "--shapes", "tiny-llama", "--steps", "2", "--", "--append"]
    command = command_line(cli.parse_args(argv))
    assert command[1:] == ["-m", MODULE, "--shapes", "tiny-llama", "--steps", "2", "--append"]
    script = REPO / "benchmarks" / "train_bench.py"
    command = command_line(cli.parse_args([*argv[:1], "--script", str(script), *argv[1:]]))
    assert command[1:] == [str(script), "--shapes", "tiny-llama", "--steps", "2", "--append"]
    assert cli.main(["bench", "--script", str(tmp_path / "none.py")]) == 1
    assert "no such file" in capfd.readouterr().err


def test_bench_runs_from_an_installed_package_outside_the_checkout(tmp_path):
    """A copy of the package with no benchmarks/ beside it, run from another folder."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "fastlm", site / "fastlm", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "work").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(site)
    result = subprocess.run(
        [sys.executable, "-m", "fastlm", "bench", "--list-shapes"],
        cwd=tmp_path / "work",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| shape | model_type |")
    assert {"llama-3.2-1b", "tiny-llama"} <= {line.split(" | ")[0].lstrip("| ") for line in lines}


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.real_model
def test_real_gemma3_sft_two_steps_and_export(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastlm.real_models import gemma3_270m_path

    gemma3_270m_path()  # converted once (cached), outside the timed CLI run
    data = Path(__file__).resolve().parent.parent / "fastlm" / "data" / "demo_instructions.jsonl"
    out = tmp_path / "out"
    code = run(
        ["sft", "--data", data, "--max-samples", 8, "--output-dir", out, "--max-steps", 2]
        + ["--batch-size", 1, "--grad-accum", 1, "--max-seq-length", 128]
        + ["--save-method", "merged_16bit"]
    )
    assert code == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    assert summary["data_format"] == "instruction"
    merged = out / "merged_16bit"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Extract the event as JSON.\n\nAna is singing in Oslo."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] < generated.shape[1] <= ids.shape[1] + 4
