"""QLoRA under TRL's SFTTrainer with bitsandbytes' 8-bit optimisers and the memory callback."""

from __future__ import annotations

import pytest
import torch
from test_trl import ON_GPU, _data, _tiny_peft_model, _training_args

import fastlm

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_sft_trainer_qlora_with_8bit_optimiser_and_memory_callback(tmp_path, optim):
    from trl import SFTConfig, SFTTrainer

    # r=64: bitsandbytes keeps 32-bit moments for tensors under 4096 elements; these reach it.
    model, tokenizer = _tiny_peft_model(
        tmp_path,
        "llama",
        r=64,
        lora_alpha=64,
        load_in_4bit=True,
        use_gradient_checkpointing="fastlm",
    )
    args = SFTConfig(
        **_training_args(tmp_path, max_steps=12, logging_steps=4, max_length=64, optim=optim)
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=_data(),
        args=args,
        callbacks=[fastlm.MemoryCallback()],
    )
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert type(optimizer).__module__.startswith("bitsandbytes.optim")
    big = [s for p, s in optimizer.state.items() if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 for s in big)  # 8-bit moments
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3
    assert logs[-1]["loss"] < logs[0]["loss"]
    memory_keys = {"mem_peak_gib"} if ON_GPU else {"mem_peak_rss_gib"}
    assert memory_keys <= logs[0].keys() and logs[0][memory_keys.pop()] > 0


def test_print_memory_reports_figures(capsys):
    stats = fastlm.print_memory("now")
    expected = {"allocated", "reserved", "peak"} if ON_GPU else {"rss", "peak_rss"}
    assert stats.keys() == expected and all(value >= 0 for value in stats.values())
    if not ON_GPU:
        assert 0 < stats["rss"] <= stats["peak_rss"] * 1.01
    assert "now:" in capsys.readouterr().out
