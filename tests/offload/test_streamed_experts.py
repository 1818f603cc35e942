"""Weight streaming of a QLoRA mixture-of-experts model: the experts' NF4 bytes
(``fastlm/models/nf4_experts.py``) travel with their layer, like the Linear4bit weights.

On the CPU the copy engine copies at once (``SyncCopyEngine``), so these tests check the logic:
a streamed step is bit-identical to the resident one (loss and every LoRA gradient, experts'
included), every expert dequantisation reads a slot and never the host copy, the layer buffer
holds the experts' bytes, and the random-weight builder of benchmark shapes gives the same model
streamed or not."""

from __future__ import annotations

import pytest
import torch
from nf4_format import run_4bit_layers_from_format
from tiny_models import GEMMA4_TEXT_MOE, copy_lora, save_tiny_model, tiny_batch, tiny_config

from fastlm import FastModel
from fastlm.loading.checkpointing import enable_checkpointing
from fastlm.models import nf4_experts
from fastlm.models.nf4_experts import is_nf4_expert_weight
from fastlm.offload.streamed_loading import build_random_nf4_model
from fastlm.offload.streamer import (
    four_bit_weights,
    get_weight_streamer,
    layer_nbytes,
    stream_weights,
)

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers.models.qwen3_moe")
pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4  # more than the two slots: slots are reused within a step
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    return save_tiny_model("qwen3_moe", folder, num_hidden_layers=LAYERS, mlp_only_layers=[])


def _qlora(path, checkpointing, targets=("q_proj", "v_proj"), parameters=EXPERTS):
    model, _ = FastModel.from_pretrained(str(path), load_in_4bit=True, device_map="cpu")
    model = FastModel.get_peft_model(
        model,
        r=4,
        lora_alpha=8,
        target_modules=list(targets),
        target_parameters=parameters,
        init_lora_weights=False,
        use_gradient_checkpointing=False,
    )
    if checkpointing:
        enable_checkpointing(model, checkpointing)
    return model.train()


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture
def slot_reads(monkeypatch):
    """Every expert dequantisation's packed bytes and absmax, checked against the streamers'
    host buffers: on the CPU the host copy holds the right bytes too, so exactness alone would
    not notice a layer computed without being made resident."""
    streamers, reads = [], []
    original = nf4_experts.dequantize_nf4

    def watched(packed, state, *args, **kwargs):
        for tensor in (packed, state.absmax):
            for streamer in streamers:
                for layer in streamer._layers.values():
                    start = layer.host.data_ptr()
                    assert not start <= tensor.data_ptr() < start + layer.nbytes, layer.index
        reads.append(packed.data_ptr())
        return original(packed, state, *args, **kwargs)

    monkeypatch.setattr(nf4_experts, "dequantize_nf4", watched)
    return streamers, reads


@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "offloaded"])
def test_a_streamed_moe_qlora_step_is_bit_identical(moe_path, checkpointing, slot_reads):
    resident = _qlora(moe_path, checkpointing)
    streamed = _qlora(moe_path, checkpointing)
    copy_lora(resident, streamed)
    streamer = stream_weights(streamed, slots=2, device="cpu")
    streamers, reads = slot_reads
    streamers.append(streamer)
    for index in streamer.streamed:  # the experts' bytes are in the layer's buffer
        kinds = [item.kind for item in four_bit_weights(streamer.layers[index])]
        assert kinds.count("packed") == 2 and kinds.count("data") == 4, kinds
    for seed in (0, 1):  # the second step starts from the first step's residency
        batch = tiny_batch(seed=seed)
        (loss_r, grads_r), (loss_s, grads_s) = _step(resident, batch), _step(streamed, batch)
        assert torch.equal(loss_r, loss_s)
        assert grads_r.keys() == grads_s.keys()
        assert sum(".experts." in n for n in grads_r) == 4 * LAYERS
        for name, grad in grads_r.items():
            assert torch.equal(grad, grads_s[name]), name
    assert reads and streamer.stats.copies > 0


def test_layer_bytes_count_the_experts_nf4_bytes(moe_path):
    model, _ = FastModel.from_pretrained(str(moe_path), load_in_4bit=True, device_map="cpu")
    layer = model.model.layers[0]
    experts = [p for p in layer.mlp.experts.parameters() if is_nf4_expert_weight(p)]
    assert len(experts) == 2
    packed = sum(w.packed.numel() + w.nf4_state.absmax.numel() for w in experts)
    attention = sum(
        w.numel() + w.quant_state.absmax.numel()
        for w in layer.self_attn.parameters()
        if hasattr(w, "quant_state")
    )
    assert packed + attention <= layer_nbytes(layer) <= packed + attention + 256 * 12


def test_random_moe_model_is_the_same_streamed_or_not():
    config = tiny_config("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[])
    config._experts_implementation = "eager"  # transformers' grouped one needs aligned sizes
    kwargs = {"dtype": torch.float32, "device": "cpu", "seed": 3, "attn_implementation": None}
    streamed = build_random_nf4_model(config, **kwargs)
    resident = build_random_nf4_model(config, stream=False, **kwargs)
    assert get_weight_streamer(streamed) is not None
    experts = streamed.model.layers[1].mlp.experts
    assert is_nf4_expert_weight(experts.gate_up_proj) and is_nf4_expert_weight(experts.down_proj)
    expected, actual = resident.state_dict(), streamed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    for model in (resident, streamed):  # not bitsandbytes' CPU forward (see nf4_format)
        run_4bit_layers_from_format(model)
    batch = tiny_batch()
    with torch.no_grad():
        assert torch.equal(resident(**batch).logits, streamed(**batch).logits)


@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "offloaded"])
def test_offload_weights_stacks_a_checkpoint_s_experts_stored_apart(moe_path, checkpointing):
    """Qwen's checkpoints store experts.<e>.gate_proj / up_proj / down_proj apart; the streamed
    loader stacks them as transformers' conversion does, into the same NF4 bytes as the
    resident load, and a training step is bit-identical."""
    resident = _qlora(moe_path, checkpointing)
    streamed, _ = FastModel.from_pretrained(
        str(moe_path), load_in_4bit=True, device_map="cpu", offload_weights=True
    )
    assert get_weight_streamer(streamed) is not None
    plain, _ = FastModel.from_pretrained(str(moe_path), load_in_4bit=True, device_map="cpu")
    for layer, expected in zip(streamed.model.layers, plain.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.mlp.experts, name)
            assert is_nf4_expert_weight(weight), name
            assert torch.equal(weight.packed, getattr(expected.mlp.experts, name).packed), name
    streamed = FastModel.get_peft_model(
        streamed,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=EXPERTS,
        init_lora_weights=False,
        use_gradient_checkpointing=False,
    )
    if checkpointing:
        enable_checkpointing(streamed, checkpointing)
    streamed.train()
    copy_lora(resident, streamed)
    batch = tiny_batch()
    (loss_r, grads_r), (loss_s, grads_s) = _step(resident, batch), _step(streamed, batch)
    assert torch.equal(loss_r, loss_s)
    for name, grad in grads_r.items():
        assert torch.equal(grad, grads_s[name]), name


# Every mixture-of-experts family: its tiny model (tests/tiny_models.py), a LoRA on one
# attention projection and PEFT's target_parameters on its experts (as their own tests name them).
STREAMED_FAMILIES = {
    "qwen3_5_moe_text": (["out_proj", "q_proj"], EXPERTS),
    "gpt_oss": (["q_proj", "v_proj"], EXPERTS),
    GEMMA4_TEXT_MOE: (["q_proj", "v_proj"], ["experts.gate_up_proj", "experts.down_proj"]),
    "llama4_text": (
        ["q_proj", "v_proj"],
        ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
    ),
    "mistral4": (["q_b_proj", "o_proj"], EXPERTS),
}


@pytest.mark.parametrize("checkpointing", [False, "unsloth"], ids=["plain", "offloaded"])
@pytest.mark.parametrize("family", sorted(STREAMED_FAMILIES))
def test_every_moe_family_streams_its_experts_bit_identically(
    tmp_path, family, checkpointing, slot_reads
):
    """The experts of each MoE family travel with their layer (two NF4 stacks in every streamed
    MoE layer's buffer, none elsewhere) and a streamed QLoRA step equals the resident one bit
    for bit: loss and every LoRA gradient, the experts' included."""
    try:
        tiny_config(family)
    except ValueError:
        pytest.skip(f"transformers without {family}")
    path = save_tiny_model(family, tmp_path / family)
    targets, parameters = STREAMED_FAMILIES[family]
    resident = _qlora(path, checkpointing, targets, parameters)
    streamed = _qlora(path, checkpointing, targets, parameters)
    copy_lora(resident, streamed)
    layers = streamed.get_base_model().model.layers
    moe_layers = {
        i for i, layer in enumerate(layers) if any(map(is_nf4_expert_weight, layer.parameters()))
    }
    assert moe_layers, "the tiny model has no NF4 experts"
    streamer = stream_weights(streamed, slots=2, device="cpu")
    streamers, reads = slot_reads
    streamers.append(streamer)
    assert len(streamer.streamed) > 2  # more layers than slots: slots are reused
    for index in streamer.streamed:
        kinds = [item.kind for item in four_bit_weights(streamer.layers[index])]
        assert kinds.count("packed") == (2 if index in moe_layers else 0), (index, kinds)
    for seed in (0, 1):
        batch = tiny_batch(seed=seed)
        (loss_r, grads_r), (loss_s, grads_s) = _step(resident, batch), _step(streamed, batch)
        assert torch.equal(loss_r, loss_s)
        assert grads_r.keys() == grads_s.keys()
        expert_grads = [n for n in grads_r if "experts" in n]
        assert len(expert_grads) == 4 * len(moe_layers), expert_grads
        for name, grad in grads_r.items():
            assert torch.equal(grad, grads_s[name]), name
            assert grad.abs().sum() > 0, name  # every LoRA factor takes part in the step
    assert reads and streamer.stats.copies > 0


def test_the_memory_plan_sizes_the_routed_experts_width():
    """A token passes k experts side by side: the plan's MLP width is k x the expert width
    where that is wider than any dense MLP (Qwen3.5-MoE has none at all), and the widest
    per-layer head size where a config sets them per layer (Gemma 4)."""
    from fastlm.offload.memory_plan import _config_dims

    pytest.importorskip("transformers.models.qwen3_5_moe")
    pytest.importorskip("transformers.models.gemma4")
    qwen = tiny_config("qwen3_5_moe_text")
    assert not hasattr(qwen, "intermediate_size")
    wanted = max(qwen.num_experts_per_tok * qwen.moe_intermediate_size,
                 qwen.shared_expert_intermediate_size)  # fmt: skip
    assert _config_dims(qwen)["inter"] == wanted
    gemma = tiny_config(GEMMA4_TEXT_MOE)
    widest = max(layer.head_dim for layer in gemma.per_layer_config)
    assert widest > min(layer.head_dim for layer in gemma.per_layer_config)
    assert _config_dims(gemma)["q"] == gemma.num_attention_heads * widest
