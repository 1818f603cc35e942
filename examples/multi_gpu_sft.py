#!/usr/bin/env python
"""LoRA / QLoRA SFT with fastlm on several GPUs: TRL's SFTTrainer, unchanged.

    torchrun --nproc_per_node 2 examples/multi_gpu_sft.py --model meta-llama/Llama-3.1-8B
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/multi_gpu_sft.py \
        --model meta-llama/Llama-3.1-8B
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/multi_gpu_sft.py \
        --model meta-llama/Llama-3.1-8B

Every process loads the model onto its own GPU (device_map={"": LOCAL_RANK}); the Trainer wraps
it in DDP (torchrun, ddp.yaml) or FSDP2 (fsdp2.yaml) and normalises the loss by the target tokens
of all ranks and accumulation steps (average_tokens_across_devices, on by default), so N GPUs
compute the same update as one GPU on the same global batch: --batch-size x GPUs x --grad-accum
sequences per step. The data defaults to fastlm's demo set (event sentence -> JSON); --dataset
takes a JSONL file of rows TRL understands ("messages", "prompt"/"completion" or "text").

A check on the CPU (gloo, two processes, any small local model folder):

    torchrun --nproc_per_node 2 examples/multi_gpu_sft.py --model DIR --cpu --max-steps 2
"""

from __future__ import annotations

import argparse
import json
import os


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="hub name or local folder")
    p.add_argument("--dataset", help="JSONL file (default: fastlm's demo instructions)")
    p.add_argument("--output-dir", default="outputs/multi_gpu_sft")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per GPU per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (lora_alpha = r)")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA (DDP; see docs/multi_gpu.md)")
    p.add_argument(
        "--checkpointing",
        default="fastlm",
        choices=("fastlm", "true", "false"),
        help="fastlm: layer inputs offloaded to CPU RAM; true: plain checkpointing",
    )
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo), for a quick check")
    p.add_argument("--no-save", action="store_true", help="do not save the adapter at the end")
    return p.parse_args(argv)


def load_rows(path: str | None):
    from datasets import Dataset

    if path is None:
        from fastlm.data import load_demo_dataset

        rows = [{"messages": r["messages"]} for r in load_demo_dataset("train")]
    else:
        with open(path, encoding="utf-8") as stream:
            rows = [json.loads(line) for line in stream if line.strip()]
    return Dataset.from_list(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    from trl import SFTConfig, SFTTrainer

    from fastlm import FastModel

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model, tokenizer = FastModel.from_pretrained(
        args.model,
        max_seq_length=args.max_seq_length,
        # Each process its own GPU: "auto" would spread one model over all the visible GPUs.
        device_map="cpu" if args.cpu else {"": local_rank},
        load_in_4bit=args.load_in_4bit,
    )
    checkpointing = {"fastlm": "fastlm", "true": True, "false": False}[args.checkpointing]
    model = FastModel.get_peft_model(
        model, r=args.r, lora_alpha=args.r, use_gradient_checkpointing=checkpointing
    )
    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=min(5, args.max_steps // 10),
        logging_steps=1,
        max_length=args.max_seq_length,
        bf16=not args.cpu,
        use_cpu=args.cpu,
        # get_peft_model has set checkpointing up (offloaded with "fastlm"); the Trainer's own
        # switch would replace it with transformers' plain checkpointing.
        gradient_checkpointing=False,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient every step
        report_to=[],
        save_strategy="no",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_rows(args.dataset),
        processing_class=tokenizer,
    )
    trainer.train()
    if args.no_save:
        return
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file on rank 0
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(args.output_dir)  # a plain PEFT adapter, written by the main process


if __name__ == "__main__":
    main()
