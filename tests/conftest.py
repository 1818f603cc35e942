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


def pytest_runtest_logreport(report):
    """With FASTLM_FAILURE_LOG set, each failing test's report is appended to that file as it
    happens: a run stopped by a time limit still says what failed and why."""
    path = os.environ.get("FASTLM_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-4000:]}\n")


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True, scope="session")
def _interpreter_bf16_like_the_gpu():
    """Triton's CPU interpreter (3.9) gets bf16 wrong twice: it casts fp32 to bf16 by truncation
    where a GPU rounds to nearest even (half of its casts differ, with twice the error), and its
    ``tl.dot`` multiplies bf16 operands' bit patterns as integers (garbage). For the whole session
    the interpreter's fp32 -> bf16 casts (stores into bf16, ``.to(tl.bfloat16)``) round as the
    GPU's, and its dots read bf16 operands as the numbers they are (exactly, in fp32), so that a
    kernel's bf16 results on the CPU are the GPU's up to summation order and its bf16 accuracy can
    be judged here (tests/kernels/test_interpreter_bf16.py checks both)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import numpy as np  # lazy: the interpreter's arrays
    import triton.language as tl  # lazy: after TRITON_INTERPRET is set
    from triton.runtime import interpreter  # lazy: as above

    builder = interpreter.InterpreterBuilder
    names = ("cast_impl", "create_fp_to_fp", "create_dot")
    originals = {name: getattr(builder, name) for name in names}

    def to_bf16(src):  # torch's cast rounds to nearest even, as the GPU's does
        data = np.array(src.data, dtype=np.float32)  # a copy, 0-d kept 0-d
        bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return interpreter.TensorHandle(bits.reshape(data.shape), tl.bfloat16)

    def to_fp32(handle):  # bf16 bits -> the fp32 numbers they are (exact)
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = np.array(handle.data, dtype=np.uint16).astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def rounded(name):
        def cast(self, src, dst_type, *rest):
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                return to_bf16(src)
            return originals[name](self, src, dst_type, *rest)

        return cast

    def dot(self, a, b, *rest):
        return originals["create_dot"](self, to_fp32(a), to_fp32(b), *rest)

    patches = {"cast_impl": rounded("cast_impl"), "create_fp_to_fp": rounded("create_fp_to_fp"),
               "create_dot": dot}  # fmt: skip
    for name, patch in patches.items():
        setattr(builder, name, patch)
    yield
    for name, original in originals.items():
        setattr(builder, name, original)


@pytest.fixture
def kernel_on_cpu(monkeypatch) -> list:
    """fastlm's flash kernel on CPU tensors too (Triton's interpreter, on a host without a GPU)
    and on CUDA tensors; returns the list its launches append to: 1 for a fixed-length launch,
    "varlen" for a packed one. Where there is a GPU, Triton compiles for it and cannot take CPU
    tensors: a test with this fixture puts the patched model's tensors on ``device``."""
    from fastlm.kernels import flash_attention as fa  # lazy: only the tests that ask
    from fastlm.models import attention

    monkeypatch.setattr(attention, "use_triton", lambda t: True)
    monkeypatch.setattr(fa, "use_triton", lambda t: True)
    return kernel_launches(monkeypatch)


@pytest.fixture
def every_kernel_on_cpu(kernel_on_cpu, monkeypatch) -> list:
    """``kernel_on_cpu`` for every fastlm kernel (norms, RoPE, activations, the loss...): each
    module that dispatches with ``_dispatch.use_triton`` takes its Triton path on CPU tensors,
    as on a GPU. Returns the flash launches' list."""
    import sys

    from fastlm.kernels import _dispatch  # lazy: only the tests that ask

    for module in list(sys.modules.values()):
        dispatches = getattr(module, "use_triton", None) is _dispatch.use_triton
        if getattr(module, "__name__", "").startswith("fastlm.") and dispatches:
            monkeypatch.setattr(module, "use_triton", lambda t: True)
    return kernel_on_cpu


def kernel_launches(monkeypatch) -> list:
    """A list that each flash launch appends to (1 fixed-length, "varlen" packed)."""
    from fastlm.kernels import flash_attention as fa  # lazy: only the tests that ask

    calls = []
    for name, mark in (("flash_attention_triton", 1), ("flash_attention_varlen_triton", "varlen")):
        launch = getattr(fa, name)

        def recorded(*args, _launch=launch, _mark=mark, **kwargs):
            calls.append(_mark)
            return _launch(*args, **kwargs)

        monkeypatch.setattr(fa, name, recorded)
    return calls


# transformers' Gated DeltaNet functions, which it binds to fla's kernels when fla imports.
_DELTANET_MODELING = ("qwen3_5", "qwen3_5_moe")
_DELTANET_FUNCTIONS = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


@pytest.fixture(scope="session", autouse=True)
def deltanet_references_run_where_fla_cannot():
    """With flash-linear-attention installed, transformers calls fla's Triton kernels for every
    Qwen3.5 tensor (it chooses once, at import): CPU tensors, and a GPU whose fla refuses to
    train, would fail in the references. There they get transformers' own PyTorch bodies, as on
    a host without fla; elsewhere fla's kernels, as transformers would run them. Nothing changes
    on a host without fla."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("fla") is None:
        yield
        return
    patch = pytest.MonkeyPatch()
    for family in _DELTANET_MODELING:
        try:
            modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:  # a transformers without this family
            continue
        for name in _DELTANET_FUNCTIONS:
            patch.setattr(modeling, name, _where_fla_runs(getattr(modeling, name)))
    yield
    patch.undo()


def _where_fla_runs(chosen):
    """``chosen`` (transformers' pick) for CUDA tensors fla trains on, else its PyTorch body."""
    import functools
    import inspect

    from fastlm.models.linear_attention import fla_refusal

    body = inspect.unwrap(chosen)
    parameters = inspect.signature(body).parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    names = {p.name for p in parameters}

    @functools.wraps(chosen)  # inspect.unwrap still reaches the body (fastlm's reference)
    def run(first, *args, **kwargs):
        if first.is_cuda and not fla_refusal(first.device):
            return chosen(first, *args, **kwargs)
        kwargs = kwargs if takes_any else {k: v for k, v in kwargs.items() if k in names}
        return body(first, *args, **kwargs)

    return run


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
