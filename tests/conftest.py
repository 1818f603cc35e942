"""Test set-up: on a machine without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before anything imports triton (peft and transformers do).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one torch thread is faster, and leaves the other core to other jobs (worker
    processes, a parallel test run). A module uses it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_logging():
    """cli.main configures the "fastlm" logger and warning filters for a terminal: undo it.
    A module that runs the CLI: ``pytestmark = pytest.mark.usefixtures("cli_logging")``."""
    import logging
    import warnings

    logger = logging.getLogger("fastlm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    with warnings.catch_warnings():
        yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama (vocab 300) with a SentencePiece-style tokenizer, saved to disk: the model
    the CLI tests train and export."""
    from test_cli import sentencepiece_tokenizer
    from tiny_models import save_tiny_model

    path = tmp_path_factory.mktemp("cli") / "llama"
    save_tiny_model("llama", path, vocab_size=300)
    sentencepiece_tokenizer().save_pretrained(path)
    return path


import sys  # noqa: E402

# Shared helpers (tiny configs, tokenizer) live beside this file.
sys.path.insert(0, os.path.dirname(__file__))
