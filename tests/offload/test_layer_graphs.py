"""Checkpointed layers replayed as CUDA graphs (``fastlm.offload.layer_graphs``).

On a GPU the real graphs are captured and replayed. On the CPU a stand-in keeps the contract a
capture imposes: the capture runs the layer once under a mode that raises on every operation
that would wait for the GPU (as CUDA refuses them while a stream is capturing), and ``replay()``
runs it again against the same static buffers -- so what reaches the layer is only what was
copied into them. Every check ends in the loss and LoRA gradients of the unpatched HF model +
PEFT (fp32, the families' tolerance), step after step: eager, captured, replayed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import relative_error, save_tiny_model, tiny_batch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))  # the families' HF/fastlm pairs
sys.path.insert(0, str(Path(__file__).parents[1] / "embeddings"))  # and the embedding bodies
from test_architectures import RTOL, _assert_loss_and_lora_grads_match, _pair  # noqa: E402

from fastlm import FastModel
from fastlm.offload import checkpoint, layer_graphs
from fastlm.offload.layer_graphs import EXPERTS_READ_SIZES, LayerGraphs

pytestmark = pytest.mark.usefixtures("one_thread")

# What a capturing CUDA stream refuses: results read back by the host.
_WAITS = {"_local_scalar_dense", "nonzero", "equal", "masked_select", "_unique2", "unique_dim"}


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in _WAITS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        return func(*args, **(kwargs or {}))


class _CpuGraph:
    def __init__(self, body):
        self.body = body

    def replay(self):
        self.body()


class _CpuLayerGraphs(LayerGraphs):
    """The real planning and bookkeeping; CPU tensors allowed, capture as described above."""

    def _device_ok(self, hidden):
        return True

    def capture(self, device, body):
        with _NoHostReads():
            body()
        return _CpuGraph(body)


@pytest.fixture
def graphs(monkeypatch, device):
    """A fresh LayerGraphs for the test (the real one on a GPU, the CPU stand-in otherwise)."""
    fresh = LayerGraphs(enabled=True) if device == "cuda" else _CpuLayerGraphs(enabled=True)
    monkeypatch.setattr(checkpoint, "LAYER_GRAPHS", fresh)
    return fresh


def _unpadded(seq: int = 11) -> dict:
    batch = tiny_batch(seq=seq)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    batch["labels"] = batch["input_ids"].clone()
    return batch


def _layers(model) -> int:
    return model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_replayed_steps_match_hf(tmp_path, model_type, device, graphs):
    reference, fast = _pair(tmp_path, model_type, "unsloth", device=device)
    n = _layers(fast)
    batch = _unpadded()
    for _ in range(3):  # eager, captured + replayed, replayed
        _assert_loss_and_lora_grads_match(reference, fast, batch)
    assert graphs.counts["captured (forward)"] == n
    assert graphs.counts["captured (backward)"] == n
    assert graphs.counts["replayed"] == 4 * n  # two pieces a layer, two steps
    assert graphs.counts["eager: first call of a shape (capture follows)"] == 2 * n


def test_the_loss_replays_in_the_layers_pool(tmp_path, device, graphs, monkeypatch):
    """The LM-head loss (the fused cross-entropy's Triton path; on the CPU the interpreter) is
    captured into the graphs' pool on the second step and replayed after: the loss and every
    LoRA gradient as HF's through eager, captured and replayed steps, for each batch shape."""
    import fastlm.kernels.fused_linear_cross_entropy as flce

    if device == "cpu":
        monkeypatch.setattr(flce, "use_triton", lambda tensor: True)
    buffers = []  # the loss's first calls ask the pool to start with a block for its buffer

    def buffer_bytes(*args):
        buffers.append(flce.scratch_bytes(*args))
        return buffers[-1]

    monkeypatch.setattr(layer_graphs, "scratch_bytes", buffer_bytes)
    graphs.measure_peak = True  # and so the pool's growth per capture kind, in the report
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    for batch in (_unpadded(), _unpadded(), _unpadded(), _unpadded(seq=7), _unpadded(seq=7)):
        _assert_loss_and_lora_grads_match(reference, fast, batch)
    assert len(buffers) == 2 and buffers[0] > buffers[1] > 0  # one per shape, the first larger
    assert graphs._reserves == {torch.device(device): buffers[0]}
    assert graphs.counts["loss eager: first call of a shape (capture follows)"] == 2
    assert graphs.counts["loss captured"] == 2
    assert graphs.counts["loss replayed"] == 3  # two of the first shape, one of the second
    kinds = ("a layer's backward", "a layer's forward", "the loss")
    assert sorted(graphs.pool_growth) == list(kinds)
    assert all("the pool grew" in line for line in graphs.report().splitlines()[-3:])


@pytest.mark.parametrize(
    "needs, bias, use_kernel, reason",
    [
        ((True, True, False), False, True, "an LM head that trains or has a bias"),
        ((True, False, False), True, True, "an LM head that trains or has a bias"),
        ((True, False, False), False, False, "the loss's torch path"),
    ],
)
def test_a_loss_that_cannot_be_graphed_runs_eagerly(
    graphs, device, needs, bias, use_kernel, reason
):
    """A trained head (its gradient would be a static output of the vocabulary's size), a head
    bias and the torch path (it picks the labelled rows on the host) run as plain calls."""
    # On the graphs' device: tensors elsewhere are never graphed, so nothing would be counted.
    hidden, weight = torch.randn(6, 4, device=device), torch.randn(9, 4, device=device)
    labels = torch.arange(6, device=device)
    head_bias = torch.randn(9, device=device) if bias else None
    calls = []

    def compute(*args):
        calls.append(args)
        return "computed"

    cfg = (-100, None, None, needs, use_kernel)
    for _ in range(3):
        assert (
            graphs.run_loss(compute, hidden, weight, head_bias, labels, hidden.new_ones(()), cfg)
            == "computed"
        )
    assert len(calls) == 3
    [(what, count)] = graphs.counts.items()
    assert what.startswith(f"loss eager: {reason}") and count == 3


def test_an_embedding_body_replays_on_batches_without_padding(tmp_path, device, graphs):
    """An embedding model (Qwen3 body, offloaded checkpointing) on pairs whose texts fill their
    rows (no padding: no packing either): InfoNCE loss and every LoRA gradient as the unpatched
    model's through eager, captured and replayed steps; queries and documents are two shapes."""
    from test_patched_body import _assert_same_embeddings_loss_and_grads
    from test_patched_body import _pair as embedding_pair

    from fastlm.embeddings import EmbeddingCollator

    # The reference checkpoints as transformers does (so it never meets the graphs)
    reference, fast = embedding_pair(tmp_path, "qwen3", True, device)
    checkpoint.enable_offloaded_checkpointing(fast.backbone)
    rows = [{"query": "find a cat", "response": "the cat sat on the mat"},
            {"query": "dog, run!!", "response": "a fox jumps over a log"}]  # fmt: skip
    batch = EmbeddingCollator(fast, prompts={})(rows)
    texts = [side for side in batch.values() if isinstance(side, dict)]
    assert len(texts) == 2 and all(bool(t["attention_mask"].all()) for t in texts)  # no padding
    batch = {
        key: {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value
        for key, value in batch.items()
    }
    for _ in range(3):
        _assert_same_embeddings_loss_and_grads(reference, fast, batch)
    layers = reference.backbone.config.num_hidden_layers
    assert graphs.counts["captured (backward)"] == 2 * layers, dict(graphs.counts)  # 2 shapes
    assert graphs.counts["replayed"] == 2 * 2 * 2 * layers  # 2 pieces, 2 shapes, steps 2 and 3


def test_an_embedding_body_replays_packed_rows(tmp_path, device, graphs, request):
    """Pairs of different lengths, padding-free: a step's queries and documents run as one
    packed row (int32 cu_seq_lens, max_length_q), padded to a steady shape (``bucketed``), so
    that steps whose texts differ in length share one capture -- with no offset read on the
    host inside it -- and replay it; the vectors, the InfoNCE loss and every LoRA gradient equal
    the unpatched model's padded ones step after step."""
    from test_patched_body import _assert_same_embeddings_loss_and_grads
    from test_patched_body import _pair as embedding_pair

    from fastlm.embeddings import EmbeddingCollator
    from fastlm.embeddings.padding_free import PADDING_FREE

    if device == "cpu":
        request.getfixturevalue("kernel_on_cpu")  # the packed kernel, as on a GPU
    reference, fast = embedding_pair(tmp_path, "qwen3", True, device)
    checkpoint.enable_offloaded_checkpointing(fast.backbone)
    steps = [
        [{"query": "find the cat", "response": "a much longer text about cats and mats"},
         {"query": "fox?", "response": "x"}],
        [{"query": "a dog", "response": "dogs run in the park by the sea"},
         {"query": "where is the fox?", "response": "in a den"}],
    ]  # fmt: skip
    batches = []
    for rows in steps:
        batch = EmbeddingCollator(fast, prompts={})(rows)
        assert not batch["response"]["attention_mask"].all()  # padded: the rows pack
        batches.append({
            key: {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value
            for key, value in batch.items()
        })  # fmt: skip
    lengths = [sum(int(b[side]["attention_mask"].sum()) for side in ("query", "response"))
               for b in batches]  # fmt: skip
    assert lengths[0] != lengths[1] and max(lengths) < 64  # different rows, one steady shape
    for batch in (batches[0], batches[0], batches[1]):  # eager, captured + replayed, replayed
        _assert_same_embeddings_loss_and_grads(reference, fast, batch)
    assert fast.latest_batch_path.layout == PADDING_FREE
    layers = reference.backbone.config.num_hidden_layers
    counts = dict(graphs.counts)
    assert not [what for what in counts if "packed" in what or "failed" in what], counts
    assert counts["captured (backward)"] == layers, counts  # the joined rows: one shape
    assert counts["replayed"] >= 2 * 2 * layers, counts  # both pieces, steps 2 and 3


def test_gradients_accumulate_over_micro_batches(tmp_path, device, graphs):
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    batches = [_unpadded(), {k: v.flip(0) for k, v in _unpadded().items()}]
    for _ in range(2):  # the second round replays
        grads = []
        for model in (reference, fast):
            model.zero_grad(set_to_none=True)
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if "lora_" in n})
        for name, expected in grads[0].items():
            assert torch.allclose(grads[1][name], expected, rtol=1e-4, atol=1e-6), name
    assert graphs.counts["replayed"] >= 2 * _layers(fast)


def test_a_new_sequence_length_is_captured_apart(tmp_path, device, graphs):
    reference, fast = _pair(tmp_path, "qwen3", "unsloth", device=device)
    for seq in (11, 7, 11, 7, 11):
        _assert_loss_and_lora_grads_match(reference, fast, _unpadded(seq))
    n = _layers(fast)
    assert graphs.counts["captured (forward)"] == 2 * n  # one per layer and length
    assert graphs.counts["replayed"] == 2 * n * 3  # lengths 11, 11 and 7 the third time on


def test_more_shapes_than_the_limit_run_eagerly(tmp_path, device, graphs):
    graphs.max_signatures = 1
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    for seq in (11, 7, 7):
        _assert_loss_and_lora_grads_match(reference, fast, _unpadded(seq))
    assert graphs.counts["eager: more than 1 call shapes"] == 2 * _layers(fast)  # per layer call
    assert "captured (forward)" not in graphs.counts


def test_a_layer_that_reads_back_falls_back_to_eager(tmp_path, device, graphs):
    """A layer that reads a result back to the host (as a padding-mask check does) cannot be
    captured: it runs eagerly from then on, the report says so, and the numbers still match."""
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    for layer in fast.base_model.model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: args[0].sum().item() and None)
    for _ in range(3):
        _assert_loss_and_lora_grads_match(reference, fast, _unpadded())
    failed = [what for what in graphs.counts if what.startswith("eager: capture failed")]
    assert failed and "replayed" not in graphs.counts
    assert "capture failed" in graphs.report()


@pytest.mark.parametrize("model_type", ["gemma2", "llama"])
def test_masks_read_by_the_kernel_path_replay_only_when_equal(tmp_path, model_type, graphs,
                                                                request, device):  # fmt: skip
    """Gemma 2 (eager masks, windowed layers) and Llama (padding only): the attention reads
    each mask on the host (the kernel path, in the interpreter on the CPU). The same padding
    replays; other padding runs eagerly, with the report saying so; all of it matches HF."""
    if device == "cpu":
        request.getfixturevalue("kernel_on_cpu")
    reference, fast = _pair(tmp_path, model_type, "unsloth", device=device)
    for _ in range(3):  # eager, captured + replayed, replayed
        _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    n = _layers(fast)
    assert graphs.counts["replayed"] == 4 * n
    other = tiny_batch()
    other["attention_mask"] = other["attention_mask"].flip(0)
    other["labels"] = other["labels"].flip(0)
    _assert_loss_and_lora_grads_match(reference, fast, other)
    assert graphs.counts["eager: a mask unlike the one the graphs were captured with"] == n
    assert graphs.counts["replayed"] == 4 * n


def test_dropout_runs_eagerly(tmp_path, device, graphs):
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    for module in fast.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    fast(**{k: v.to(device) for k, v in _unpadded().items()}).loss.backward()
    reasons = [what for what in graphs.counts if "dropout" in what]
    assert reasons and graphs.counts[reasons[0]] == _layers(fast)


def test_rows_packed_by_position_ids_alone_run_eagerly(tmp_path, device, graphs):
    _, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    batch = _unpadded()
    batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]] * 3)
    fast(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
    reason = "eager: a batch packed by position_ids alone (pass cu_seq_lens_q/k)"
    assert graphs.counts[reason] > 0, dict(graphs.counts)


def test_switching_the_adapter_off_is_a_new_signature(tmp_path, device, graphs):
    """A replay never runs a layer whose adapters were switched off since its capture."""
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    batch = {k: v.to(device) for k, v in _unpadded().items()}
    for _ in range(2):
        fast(**batch).loss.backward()
    with fast.disable_adapter(), reference.disable_adapter():
        expected = reference(**batch).loss
        actual = fast(**batch).loss
    assert torch.allclose(actual, expected, rtol=1e-5)
    assert graphs.counts["eager: first call of a shape (capture follows)"] == 3 * _layers(fast)


def test_full_fine_tuning_replays_exactly(tmp_path, device, graphs):
    """Every weight trainable (HF's own model, checkpointed, against fastlm's full fine-tune):
    the loss and every gradient step after step, through eager, captured and replayed steps;
    one set of gradient buffers serves all layers."""
    path = save_tiny_model("qwen3", tmp_path / "qwen3")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map=device)
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast, _ = FastModel.from_pretrained(
        path, dtype=torch.float32, device_map=device, full_finetuning=True,
        use_gradient_checkpointing="unsloth",
    )  # fmt: skip
    reference.train()
    fast.train()
    batch = {k: v.to(device) for k, v in _unpadded().items()}
    for _ in range(3):
        losses, grads = [], []
        for model in (reference, fast):
            model.zero_grad(set_to_none=True)
            losses.append(model(**batch).loss)
            losses[-1].backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert torch.allclose(losses[1], losses[0], rtol=RTOL)
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
        for name, grad in grads[0].items():
            assert relative_error(grads[1][name], grad) <= RTOL, name
    # steps 2 and 3 replay each layer's forward and backward (step 2 right after capturing)
    assert graphs.counts["replayed"] == 4 * _layers(fast)
    assert len(graphs._grads) == 1


def _moe_steps(tmp_path, device, record: bool, **config):
    """Three steps of transformers + PEFT (eager experts) and fastlm on tiny Qwen3-MoE, LoRA on
    attention, MLP and experts, on ``device``: loss (aux loss included where recorded) and every
    gradient within the MoE tests' tolerance; returns the fastlm model. ``config``: sizes."""
    from test_moe import _assert_match
    from test_moe import _pair as moe_pair

    reference, fast = moe_pair(tmp_path, "unsloth", device=device, **config)
    batch = {k: v.to(device) for k, v in tiny_batch().items()}
    for model in (reference, fast):
        model.config.output_router_logits = record
    for _ in range(3):  # eager, captured + replayed, replayed
        if record:
            _assert_match(reference, fast, batch)
        else:
            _assert_loss_and_lora_grads_match(reference, fast, batch)
    return fast


# Expert sizes torch._grouped_mm takes in fp32 (rows of 16-byte multiples); the tiny model's odd
# ones take one product per expert, which reads the group sizes on the host.
ALIGNED_EXPERTS = {"moe_intermediate_size": 32}


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="fp32 experts take one product per expert on CUDA (torch._grouped_mm: bf16 only); "
    "the bf16 test replays them there",
)
def test_mixture_of_experts_layers_replay_when_nothing_is_recorded(tmp_path, device, graphs):
    """Without output_router_logits (no load-balancing loss) nothing reads a MoE block's router
    logits: with experts the grouped GEMM takes, LoRA on them included, every layer is captured
    and replayed, and the steps match transformers + PEFT."""
    fast = _moe_steps(tmp_path, device, record=False, **ALIGNED_EXPERTS)
    assert graphs.counts["captured (backward)"] == _layers(fast)
    assert not [what for what in graphs.counts if "mixture-of-experts" in what]


def test_experts_that_read_their_sizes_on_the_host_run_eagerly(tmp_path, device, graphs):
    """Experts of odd sizes take one product per expert, which reads the group sizes on the
    host -- something a capture refuses (and a failed first capture used to leave the pool
    unusable for every later one). The layer's first, eager call notices the read: those layers
    run eagerly from then on, say why, and the steps stay exact."""
    from test_moe import FAMILIES

    fast = _moe_steps(tmp_path, device, record=False)
    moe_layers = FAMILIES["qwen3_moe"].moe_layers
    assert graphs.counts[f"eager: {EXPERTS_READ_SIZES}"] == 2 * moe_layers  # steps 2 and 3
    assert graphs.counts["captured (backward)"] == _layers(fast) - moe_layers
    assert not [what for what in graphs.counts if "capture failed" in what]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm's bf16 CUDA path")
def test_bf16_experts_replay_as_they_run_eagerly(tmp_path, graphs):
    """On a GPU in bf16 the experts' grouped GEMMs read nothing on the host: every layer of a
    tiny Qwen3-MoE (LoRA r=16 on the experts too) is captured and replayed, and each step's loss
    and LoRA gradients equal the same model's without graphs (the same kernels)."""
    from test_moe import FAMILIES

    spec = FAMILIES["qwen3_moe"]
    path = save_tiny_model("qwen3_moe", tmp_path / "moe", moe_intermediate_size=64)
    batch = {k: v.cuda() for k, v in tiny_batch().items()}
    lora = dict(r=16, lora_alpha=16, target_modules=spec.target_modules,
                target_parameters=spec.target_parameters, random_state=0)  # fmt: skip

    def steps(graphed: bool) -> tuple[list, torch.nn.Module]:
        graphs.enabled = graphed
        model, _ = FastModel.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
        model = FastModel.get_peft_model(model, use_gradient_checkpointing="unsloth", **lora)
        model.train()
        out = []
        for _ in range(3):  # eager, captured + replayed, replayed
            loss = model(**batch).loss
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            out.append((loss.detach(), grads))
            model.zero_grad(set_to_none=True)
        return out, model

    eager, _ = steps(False)
    replayed, fast = steps(True)
    assert graphs.counts["captured (backward)"] == _layers(fast)
    for (loss, grads), (expected, expected_grads) in zip(replayed, eager):
        torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-3)
        for grad, want in zip(grads, expected_grads):
            torch.testing.assert_close(grad, want, rtol=2e-2, atol=1e-3)


def test_recorded_router_logits_run_eagerly(tmp_path, device, graphs):
    """With the load-balancing loss the router logits are recorded by forward hooks (which a
    replay does not fire) and the blocks' backward adds the loss's gradient: every MoE layer
    runs eagerly, says why, and the steps still match transformers + PEFT."""
    from test_moe import FAMILIES

    fast = _moe_steps(tmp_path, device, record=True)
    moe_layers = FAMILIES["qwen3_moe"].moe_layers
    reason = "eager: a mixture-of-experts block with the load-balancing loss's gradient"
    assert graphs.counts[reason] == 3 * moe_layers  # every step's forward plan of each
    assert graphs.counts["captured (forward)"] == _layers(fast) - moe_layers  # the dense ones


def test_the_layers_of_a_signature_share_their_gradient_buffers(tmp_path, device, graphs):
    """One set of LoRA-gradient buffers for all layers of a shape (each replay's gradients
    reach .grad before the next layer's replay), and the steps stay exact."""
    reference, fast = _pair(tmp_path, "llama", "unsloth", device=device)
    for _ in range(3):
        _assert_loss_and_lora_grads_match(reference, fast, _unpadded())
    sets = [g.grads for info in graphs._layers.values() for g in info.graphs.values()]
    assert len(sets) == _layers(fast) and all(s is sets[0] for s in sets)
    assert len(graphs._grads) == 1


class _Allocator:
    """The CUDA allocator's statistics as peak_bytes() reads them, driven by hand (GiB)."""

    def __init__(self, monkeypatch, graphs):
        self.allocated = self.peak = self.pool = 0
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        self.pool_in_use = 0  # of the pool, bytes still allocated (in ``allocated`` too)
        monkeypatch.setattr(graphs, "_pool_usage", lambda: (self.pool, self.pool_in_use))

    def _reset(self, device=None):
        self.peak = self.allocated

    def use(self, allocated):
        self.allocated = allocated
        self.peak = max(self.peak, allocated)


@pytest.mark.parametrize(
    "steady, in_use, expected", [(5, 0, 10), (8, 0, 11), (7, 2, 10), (10, 2, 11)]
)
def test_the_peak_counts_a_captures_scratch_once(monkeypatch, steady, in_use, expected):
    """An eager step peaks at 10 (4 held + 6 of one layer's scratch); the capture puts the same
    scratch into the pool (3 of it kept), of which it may leave ``in_use`` allocated (a tensor
    it made that something holds: the allocator counts those in every figure after it, the
    pool too). Replays peaking at ``steady`` allocated hold ``steady - in_use`` outside the
    pool: the peak is max(10, steady - in_use + 3), not the allocator's peak plus the pool."""
    graphs = LayerGraphs(enabled=True)
    graphs.measure_peak = True
    allocator = _Allocator(monkeypatch, graphs)
    allocator.use(10)  # the eager first step
    allocator.use(4)
    graphs._note_capture("cuda", starting=True)
    allocator.use(10)  # the capture's scratch, counted as allocated while it runs
    allocator.pool, allocator.pool_in_use = 3, in_use
    allocator.use(4 + in_use)
    graphs._note_capture("cuda", starting=False)
    allocator.use(steady)  # replays
    allocator.use(4 + in_use)
    assert graphs.peak_bytes() == expected
    graphs.measure_peak = False  # no bookkeeping: the bound counts the pool on top
    assert graphs.peak_bytes() == allocator.peak + 3


def _pool_blocks_in_use(graphs: LayerGraphs) -> list[tuple[int, str]]:
    """(size, where it was allocated) of the graphs' pool blocks still allocated (counted by
    the allocator's statistics as well as by ``pool_bytes``), largest first; "where" is the
    innermost fastlm, transformers or peft frame, when the memory history was recorded."""
    pools = set(graphs._pools.values())
    segments = torch.cuda.memory._snapshot()["segments"]
    blocks = [(b["size"], _where(b.get("frames", []))) for s in segments
              if tuple(s.get("segment_pool_id", ())) in pools
              for b in s["blocks"] if b["state"] == "active_allocated"]  # fmt: skip
    return sorted(blocks, reverse=True)


def _where(frames: list[dict]) -> str:
    libraries = ("fastlm", "transformers", "peft")
    ours = [f for f in frames if any(name in f["filename"] for name in libraries)]
    frame = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{frame['filename'].rsplit('/', 2)[-1]}:{frame['line']} {frame['name']}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's statistics")
@pytest.mark.xfail(
    strict=True,
    reason="measured on an H100 (2026-12-07, tree 28f875d): 1,418.8 MB with graphs against "
    "1,325.4 MB eager + 10.4 MB of buffers + 64 MiB allowed (19 MB over; the pool 156 MiB, two "
    "32 MiB blocks of it still held); layer graphs stay opt-in until this passes",
)
def test_replayed_steps_hold_no_more_than_eager_steps_and_their_buffers(tmp_path, graphs):
    """On a GPU: the peak with graphs (pool included, peak_bytes) stays within the eager step's
    peak plus the graphs' static buffers and the pool's rounding -- the goal for making them
    the default; not met yet (the xfail says by how much)."""
    import gc

    size = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8, head_dim=128)  # fmt: skip
    path = save_tiny_model("llama", tmp_path / "llama", **size)
    model, _ = FastModel.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    model = FastModel.get_peft_model(model, r=16, use_gradient_checkpointing="unsloth")
    model.train()  # checkpointing (and so the graphs) runs in training only
    batch = {"input_ids": torch.randint(3, 100, (2, 1024), device="cuda")}  # < tiny vocab
    batch["labels"] = batch["input_ids"]

    def peak(steps: int) -> int:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return graphs.peak_bytes()

    graphs.enabled = False
    eager = peak(2)
    graphs.enabled = graphs.measure_peak = True
    torch.cuda.memory._record_memory_history(max_entries=200_000)  # where pool blocks come from
    try:
        replayed = peak(4)
        in_use = _pool_blocks_in_use(graphs)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert graphs.counts["replayed"] > 0
    buffers = [t for s in graphs._signatures.values()
               for t in (s.hidden, *s.inputs, s.out, s.grad_out, s.grad_in)]  # fmt: skip
    buffers += [t for grads in graphs._grads.values() for t in grads]
    held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in buffers}.values())
    why = dict(
        replayed=replayed, eager=eager, buffers=held, pool=graphs.pool_bytes(),
        peaks=graphs._peaks, since_last_capture=torch.cuda.max_memory_allocated(),
        counts=dict(graphs.counts), pool_blocks_in_use=in_use,
    )  # fmt: skip
    assert replayed <= eager + held + 64 * 2**20, str(why)  # a str: shown whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph pools")
def test_the_loss_capture_takes_the_pools_reserve(tmp_path, graphs):
    """The loss's logits buffer (4,096 rows x 32,000 x bf16 = 250 MiB here) is captured after
    the layers, whose scratch is freed in blocks sized to their own tensors: without a reserve
    the pool grew by the whole buffer (256 MiB of Qwen3-4B's 772 MiB pool). The pool starts
    with a free block for the loss's scratch (buffer and grad_hidden), the layers' captures
    split it and leave it whole, and the loss's capture grows the pool by (almost) nothing.
    Seen failing on an H100 with a reserve of the buffer alone, grad_hidden allocated first:
    the loss's capture grew the pool by 250 MiB (the layers' by 2)."""
    size = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                vocab_size=32000)  # fmt: skip
    path = save_tiny_model("llama", tmp_path / "llama", **size)
    model, _ = FastModel.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    model = FastModel.get_peft_model(model, r=16, use_gradient_checkpointing="unsloth")
    model.train()
    batch = {"input_ids": torch.randint(3, 32000, (2, 2048), device="cuda")}
    batch["labels"] = batch["input_ids"]
    graphs.measure_peak = True
    for _ in range(3):  # eager, captured + replayed, replayed
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    growth = dict(graphs.pool_growth)
    assert graphs.counts["loss captured"] == 1 and graphs.counts["replayed"] > 0, growth
    assert growth["the pool's reserve (the loss's scratch)"] >= 4096 * 32000 * 2, growth
    assert growth.get("the loss", 0) < 8 * 2**20, growth


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph pools")
def test_a_failed_first_capture_and_a_reset_leave_later_captures_working():
    """A first capture that fails (here: a host read) drops its graph, and ``reset`` drops them
    all; without the pool's anchor graph the allocator then forgets the pool and refuses every
    later capture into it (seen on an H100: ``use_count > 0``). Later captures must work."""
    graphs = LayerGraphs(enabled=True)
    x = torch.ones(4, device="cuda")

    def capture(body):
        return graphs._capture_or_reason(x.device, body, lambda: None, "", "a test body")

    graph, why = capture(lambda: x.sum().item())
    assert graph is None and why.startswith("capture failed")
    for _ in range(2):
        graph, why = capture(lambda: x.mul_(2))
        assert why == ""
        graph.replay()
        torch.cuda.synchronize()
        graphs.reset()
    assert x.tolist() == [4.0] * 4  # two replays; a capture itself runs nothing
