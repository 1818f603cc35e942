"""The training benchmark behind ``fastlm bench``, installed with fastlm.

    train_bench   the harness: the parent (checkpoints, one child per shape and system, the
                  outputs) and the child (load, make LoRA, time the loop); ``python -m``-able
    embedding_bench  the same for embedding fine-tuning (InfoNCE; LoRA or full; with Unsloth's
                  FastSentenceTransformer)
    sft_bench     TRL's SFTTrainer as a user runs it, timed by a TrainerCallback
    suite         every row of a table (issue 15's) in one command, in resumable parts
    shapes        the benchmarked architectures, plain data (``SHAPES``)
    checkpoint    the random-init checkpoint every system loads
    systems       how each system (hf, fastlm, liger, unsloth) becomes a LoRA model
    timing        the timed training loop, CUDA-event medians, peak memory
    processes     the children's environment, running one until it writes its record
    report        results.json, results.md (the table) and results.png

It sits at the top of fastlm with the commands: it uses the public API as users do, and nothing
else in fastlm imports it. Every module is stdlib-only at import time, and this file imports
none of them: a child process must be able to import Unsloth before transformers. Liger-Kernel
and Unsloth are optional, imported only in their own child processes. The scripts under
``benchmarks/`` in a source checkout use the same modules.
"""
