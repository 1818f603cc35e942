#!/usr/bin/env python
"""How long the exports take for a real-size model: merged 16-bit safetensors and GGUF files.

    python benchmarks/export_bench.py --shape llama-3.1-8b --methods merged_16bit,q4_k_m \
        --out benchmarks/results/<name>

Loads the benchmark's random-init checkpoint of the shape (built once, as train_bench.py does)
with fastlm on the GPU, adds LoRA r=16 on all projections with non-zero B (so the merge does
work), then times each export end to end (merge, quantise, write, rename). Prints a table and
writes results.json / results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this checkout's fastlm; the helpers here (_common.py)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from _common import no_cuda  # noqa: E402

from fastlm.benchmarking.checkpoint import CACHE, ensure_checkpoint  # noqa: E402
from fastlm.benchmarking.shapes import LORA_TARGETS, get_shape  # noqa: E402
from fastlm.benchmarking.systems import versions  # noqa: E402


def byte_tokenizer():
    """A SentencePiece-style byte-fallback BPE (specials, ▁, 256 byte tokens).

    The benchmark checkpoint's word-level tokenizer has no GGUF equivalent, and the export's
    timing does not depend on the vocabulary (the GGUF vocabulary is padded to the model's rows).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    vocab.update({f"<0x{byte:02X}>": 5 + byte for byte in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")  # SentencePiece-style spaces
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--methods", default="merged_16bit,q4_k_m", help="merged_16bit and GGUF types")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--scratch", default=None, help="where the exports are written (then deleted)")
    args = p.parse_args(argv)
    if no_cuda("export_bench.py needs a CUDA GPU", file=sys.stderr):
        return 2
    import torch

    from fastlm import FastModel

    shape = get_shape(args.shape)
    path = str(ensure_checkpoint(shape, args.cache)["path"])
    model, _ = FastModel.from_pretrained(path, dtype=torch.bfloat16)
    tokenizer = byte_tokenizer()
    model = FastModel.get_peft_model(
        model, r=16, lora_alpha=16, target_modules=list(LORA_TARGETS), init_lora_weights=False
    )
    rows = []
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    for method in args.methods.split(","):
        target = scratch / method
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if method.startswith("merged"):
            model.save_pretrained_merged(target, tokenizer, save_method=method)
        else:
            model.save_pretrained_gguf(target, tokenizer, quantization_method=method)
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "seconds": seconds, "bytes": _size(target)})
        print(f"{method:>14}: {seconds:6.1f} s, {rows[-1]['bytes'] / 1e9:.2f} GB", flush=True)
        shutil.rmtree(target)
    shutil.rmtree(scratch, ignore_errors=True)
    payload = {
        "shape": shape.name,
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "versions": versions("fastlm", "lora"),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"# Export times — {shape.name} + LoRA r=16 (merged), {payload['device']}",
        "",
        f"{payload['date']}; `{payload['command']}`",
        "",
        "| export | seconds | size GB |",
        "| --- | --- | --- |",
        *[f"| {r['method']} | {r['seconds']:.1f} | {r['bytes'] / 1e9:.2f} |" for r in rows],
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
