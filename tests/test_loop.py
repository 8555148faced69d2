"""The step's arithmetic on the real 4-bit path: accumulation, logits at supervised positions only,
GradScaler skips, the schedule."""

import dataclasses
import json
import math
import re
from collections.abc import Callable

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.batching import collate, collate_packed, pack
from qlora.config import LoraConfig, ModelConfig, TrainConfig
from qlora.data import IGNORE, Encoded, Example
from qlora.errors import UserError
from qlora.loop import accumulate_gradients, micro_batch_loss, optimizer_step
from qlora.memory import MemoryMeter
from qlora.model import apply_levers, build_model, compile_decoder_layers, decoder_layers
from qlora.optim import build_training_state, in_layout
from tests.conftest import ROOT

CPU = torch.device("cpu")
METER = MemoryMeter(CPU)


def make_rows(lengths, answer_lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = Example(id="x", question="q", answer="a")
    out = []
    for n, a in zip(lengths, answer_lengths):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        out.append(Encoded(example=ex, input_ids=ids, labels=[IGNORE] * (n - a) + ids[n - a:], truncated=False))
    return out


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_equals_one_big_batch(tiny_model_factory):
    """Micro-batches of unequal length and unequal supervised counts: the accumulated gradient
    equals the gradient of the whole window as one batch."""
    model = tiny_model_factory("fp32")
    rows = make_rows([12, 40, 25, 9, 33, 18], [2, 9, 4, 1, 7, 3])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    accumulate_gradients(model, [collate(rows, 0)], scaler, "fp32", CPU, True, METER)
    big = lora_grads(model)
    model.zero_grad()
    micro = [collate(rows[:1], 0), collate(rows[1:4], 0), collate(rows[4:], 0)]
    accumulate_gradients(model, micro, scaler, "fp32", CPU, True, METER)
    acc = lora_grads(model)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7)
    # the per-micro-batch mean (the 2024 HF Trainer bug) gives a different gradient
    model.zero_grad()
    for b in micro:
        (micro_batch_loss(model, b, "fp32", CPU, True) / b["n_supervised"] / len(micro)).backward()
    naive = lora_grads(model)
    assert max((naive[n] - big[n]).abs().max() for n in big) > 1e-3 * max(big[n].abs().max() for n in big)


def test_supervised_logits_only_gives_the_same_loss_and_gradient(tiny_model_factory):
    model = tiny_model_factory("fp32")
    batch = collate(make_rows([30, 17, 22], [5, 3, 8], seed=1), 0)
    losses, grads = [], []
    for only in (True, False):
        model.zero_grad()
        loss = micro_batch_loss(model, batch, "fp32", CPU, only)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lora_grads(model))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_packing_and_varlen_attention_give_the_same_loss_and_gradient(tiny_model_factory):
    """Examples packed back to back in one row with restarting positions: attention never crosses
    examples (SDPA with its block-diagonal mask, or varlen attention over each example), so the
    summed loss and its gradient equal the padded batch's under eager attention (the reference)."""
    rows = make_rows([30, 17, 22, 9, 12], [5, 3, 8, 2, 4], seed=2)
    padded, packed = collate(rows, 0), collate_packed(pack(rows, 96)[0])
    assert packed["input_ids"].numel() == 90 < padded["input_ids"].numel()  # no compute on padding
    results = []
    for attn in ("eager", "sdpa", "varlen"):
        model = tiny_model_factory("fp32", attn=attn)
        for batch in (padded, packed):
            model.zero_grad()
            loss = micro_batch_loss(model, batch, "fp32", CPU, True)
            loss.backward()
            results.append((loss.detach(), lora_grads(model)))
    reference, reference_grads = results[0]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
        for name in grads:  # fp32 summation order differs: compare at the tensor's own scale
            assert (grads[name] - reference_grads[name]).abs().max() <= 1e-4 * reference_grads[name].abs().max()


def test_compiled_layers_give_the_same_loss_and_gradient(tiny_model_factory):
    """torch.compile'd decoder layers compute what the eager ones do (fp32, varlen over a packed
    row); with LoRA dropout on, the checkpoint's recompute of a compiled layer replays the dropout
    masks of its forward, so checkpointing leaves the gradient unchanged."""
    packed = collate_packed(make_rows([30, 17, 22], [5, 3, 8], seed=6))

    def loss_and_grads(**kwargs):
        model = tiny_model_factory("fp32", attn="varlen", **kwargs)
        torch.manual_seed(1)
        loss = micro_batch_loss(model, packed, "fp32", CPU, True)
        loss.backward()
        return loss.detach(), lora_grads(model)

    for a, b in (({}, {"compile_layers": True}),
                 ({"compile_layers": True, "dropout": 0.1, "recompute_layers": 0},
                  {"compile_layers": True, "dropout": 0.1})):
        (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(**a), loss_and_grads(**b)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
        for name in grads_a:
            assert (grads_b[name] - grads_a[name]).abs().max() <= 1e-4 * grads_a[name].abs().max()


def test_lean_layers_save_less_for_the_same_loss_and_gradient(tiny_model_factory):
    """model.lean_layers: compiled layers that keep their activations save less for their backward
    and recompute the rest there, with the forward's LoRA dropout masks (torch's partitioner would
    draw new ones: qlora/lean.py), so the loss and gradient are a standard compiled layer's (fp32)."""
    packed = collate_packed(make_rows([30, 17, 22], [5, 3, 8], seed=6))

    def run(lean: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model = tiny_model_factory("fp32", attn="varlen", compile_layers=True, dropout=0.3, recompute_layers=0,
                                   lean=lean)
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):  # B = 0 would hide A's gradient
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(1)
        loss = micro_batch_loss(model, packed, "fp32", CPU, True)
        saved = compiled_saved_bytes(loss)
        loss.backward()
        return loss.detach(), lora_grads(model), saved

    (loss, grads, kept), (lean_loss, lean_grads, lean_kept) = run(False), run(True)
    assert lean_kept < 0.8 * kept
    torch.testing.assert_close(lean_loss, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        assert (lean_grads[name] - grads[name]).abs().max() <= 1e-4 * grads[name].abs().max(), name


def test_lean_layers_are_the_ones_that_keep_their_activations_with_offloading_on_too(tiny_model_factory):
    """Offloading routes every layer through the checkpoint's hook; the lean ones are still the
    layers that do not recompute, and levers applied again move layers between the backends."""
    from qlora.lean import lean_inductor

    model = tiny_model_factory("fp32", compile_layers=True, recompute_layers=1, lean=True, offload_inputs=True)
    assert model.activation_offload is not None
    assert [layer.compiled_with for layer in decoder_layers(model)] == ["inductor", lean_inductor]
    # bench/compare_trl.py turns levers on one after another on one model: a layer changes backend
    cfg = ModelConfig(name="tiny", compile_layers=True, recompute_layers=1)
    apply_levers(model, cfg, "fp32")
    assert [layer.compiled_with for layer in decoder_layers(model)] == ["inductor", "inductor"]
    apply_levers(model, dataclasses.replace(cfg, recompute_activations=False, lean_layers=True), "fp32")
    assert [layer.compiled_with for layer in decoder_layers(model)] == [lean_inductor, lean_inductor]


def compiled_saved_bytes(loss: torch.Tensor) -> int:
    """Bytes the compiled layers' graphs saved for the backward of `loss` (each storage once)."""
    seen, nodes, storages = set(), [loss.grad_fn], {}
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in node.name():
            storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                             for t in node.saved_tensors if torch.is_tensor(t)})
        nodes += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


def test_compiled_layers_take_no_python_float_as_a_graph_input(tiny_model_factory):
    """Norm eps, LoRA scaling and dropout p are compiled in as constants. As graph inputs they
    would be float64 CPU tensors, and their casts a C++ kernel in every CUDA layer: a compiler run
    and inductor's CPU-ISA probes at every process's first step, warm cache or not (~40 s, H200)."""
    model = tiny_model_factory("fp32", dropout=0.1)
    inputs = []

    def record(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        names = [n.name for n in graph.graph.nodes if n.op == "placeholder"]
        inputs.extend(zip(names, example_inputs))
        return graph.forward

    compile_decoder_layers(model, backend=record)
    micro_batch_loss(model, collate(make_rows([30, 17], [5, 3], seed=7), 0), "fp32", CPU, True).backward()
    scalars = {name: t.dtype for name, t in inputs if torch.is_tensor(t) and t.dim() == 0}
    assert inputs and all(name.endswith("quant_state_offset") for name in scalars), scalars  # bitsandbytes' own tensors


def test_compute_dtype_norms_and_head_keep_the_loss_within_bf16_rounding(tiny_model_factory):
    batch = collate(make_rows([30, 17, 22], [5, 3, 8], seed=3), 0)
    losses = []
    for upcast in (True, False):
        model = tiny_model_factory("bf16", upcast=upcast)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        assert frozen == ({torch.float32} if upcast else {torch.bfloat16})
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        with torch.no_grad():
            losses.append(float(micro_batch_loss(model, batch, "bf16", CPU, True)) / batch["n_supervised"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)


def test_recomputing_fewer_layers_gives_the_same_gradient(tiny_model_factory):
    batch = collate(make_rows([30, 17, 22], [5, 3, 8], seed=4), 0)
    grads = []
    for layers in (None, 1, 0):
        model = tiny_model_factory("fp32", recompute_layers=layers)
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags == {None: [True, True], 1: [True, False], 0: [False, False]}[layers]
        micro_batch_loss(model, batch, "fp32", CPU, True).backward()
        grads.append(lora_grads(model))
    for other in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_reentrant_recompute_gives_the_same_gradient_dropout_included(tiny_model_factory):
    """model.recompute_reentrant: the older checkpoint variant replays the LoRA dropout masks of the
    forward as the non-reentrant one does; without recompute the masks are the forward's own."""
    batch = collate(make_rows([30, 17, 22], [5, 3, 8], seed=4), 0)
    grads = []
    for kwargs in ({"recompute_layers": 0}, {}, {"reentrant": True}):
        model = tiny_model_factory("fp32", dropout=0.1, **kwargs)
        assert decoder_layers(model)[0]._gradient_checkpointing_func.keywords["use_reentrant"] == ("reentrant" in kwargs)
        torch.manual_seed(2)
        micro_batch_loss(model, batch, "fp32", CPU, True).backward()
        grads.append(lora_grads(model))
    for other in grads[1:]:
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision, upcast", [("bf16", False), ("fp16", True)])
def test_dequantized_layers_give_the_4bit_layers_loss_and_gradients(tiny_model_factory, precision, upcast):
    """model.dequantized_layers: the first layer's base weights dequantized once, the second's
    still 4-bit; the loss and the adapters' gradients are those of the all-4-bit model, bit for
    bit (with fp32 norms the layer's input is fp32 and is cast as bitsandbytes casts it)."""
    batch = collate(make_rows([20, 15], [4, 4]), 0)
    results = []
    for n in (0, 1):
        model = tiny_model_factory(precision, dropout=0.1, upcast=upcast, dequantized_layers=n)
        kinds = [type(m).__name__ for m in model.modules() if type(m).__name__ in ("DequantizedLinear", "Linear4bit")]
        assert kinds.count("DequantizedLinear") == 7 * n  # q, k, v, o, gate, up, down
        torch.manual_seed(3)  # the same dropout masks
        loss = micro_batch_loss(model, batch, precision, CPU, True)
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda", 0), marks=CUDA_ONLY)], ids=str)
def test_offloaded_layers_and_inputs_give_the_kept_layers_loss_and_gradients(tmp_path, device):
    """model.offload_layers and model.offload_inputs on the tiny Llama grown to 10 layers, every
    layer recomputing: layers 2 and 6 send their saved activations to host memory and back (layer 2
    freed at layer 8, layer 6 before the last; brought back from the backward of layers 4 and 8),
    and the other layers below the last their input (freed three layers on, put back from two
    layers above). The loss and gradients are those of layers keeping their activations, bit for
    bit, dropout included, over two micro-batches (the second, shorter, one placing its host copies
    in the arena the first one sized). Everything offloaded is freed by the end of the forward, and
    every copy back started ahead of its layer's backward. On a GPU (not in CI: run it there), the
    copies run on the side stream into pinned memory, and attention is eager (deterministic)."""
    config = json.loads((ROOT / "configs" / "tiny" / "model" / "config.json").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10}))
    batches = [collate(make_rows(lengths, [5, 9], seed=s), 0) for s, lengths in ((8, [1000, 900]), (9, [800, 950]))]
    results = []
    for recompute, offload, inputs in ((0, 0, False), (None, 2, False), (None, 0, True), (None, 2, True)):
        cfg = ModelConfig(name=str(tmp_path / "model"), random_init=True, random_init_cache=str(tmp_path / "cache"),
                          recompute_layers=recompute, offload_layers=offload, offload_inputs=inputs,
                          **({"attn_implementation": "eager"} if device.type == "cuda" else {}))
        model = build_model(cfg, LoraConfig(r=16, dropout=0.1), "fp32", device, 0)
        offloading, at_8 = model.activation_offload, []  # at_8: after layer 8's call freed what it frees
        if offloading:
            decoder_layers(model)[8].register_forward_pre_hook(lambda *_: at_8.append(
                ({j for j, _, _ in offloading.in_flight}, {h.layer for h in offloading.inputs_in_flight})))
        torch.manual_seed(4)
        losses = []
        for batch in batches:
            loss = micro_batch_loss(model, batch, "fp32", device, True)
            if offloading:
                assert not offloading.in_flight and not offloading.inputs_in_flight  # freed before the last layer
                assert all(offloading.held[j].tensor.untyped_storage().nbytes() == 0 for j in offloading.inputs)
            loss.backward()
            assert not offloading or not offloading.held and not offloading.inputs_back  # every input put back, read
            losses.append(loss.detach())
        results.append((losses, lora_grads(model), offloading, at_8, model))
    for losses, grads, offloading, *_ in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][0], losses))
        assert all(torch.equal(results[0][1][n], grads[n]) for n in grads)
        assert not offloading.saved and offloading.late_copies == 0 and offloading.arenas[6].numel() > 0
    assert [(o.offloaded, o.inputs) for _, _, o, *_ in results[1:]] == [
        ([2, 6], []), ([], [0, 1, 2, 3, 4, 5, 6, 7, 8]), ([2, 6], [0, 1, 3, 4, 5, 7, 8])]
    # layer 2's tensors freed at layer 8, layer 6's before the last layer (then layer 8's recompute);
    # the inputs of layers 5 and below freed there (6 and 7 are within three; layer 8's own copy has
    # started), all before the last
    assert [at_8 for *_, at_8, _ in results[1:]] == [[({6}, set()), (set(), set())] * 2,
                                                   [(set(), {6, 7, 8}), (set(), set())] * 2,
                                                   [({6}, {7, 8}), (set(), set())] * 2]
    assert results[1][2].copied_bytes >= 2 * 2 * 1900 * 192 * 4  # at least two MLP intermediates a layer went to the host
    assert results[2][2].copied_bytes == 9 * 1900 * 64 * 4  # nine inputs of 1,900 tokens x 64 fp32 values
    for (*_, model), what in zip(results[1:3], ("activations (model.offload_layers)", "input (model.offload_inputs)")):
        first = micro_batch_loss(model, batches[0], "fp32", device, True)
        micro_batch_loss(model, batches[1], "fp32", device, True)  # its host copies take the first one's place
        with pytest.raises(UserError, match=re.escape(f"offloads its {what}, and ran a second forward before")):
            first.backward()


def test_fp16_gradscaler_skips_a_step_on_inf(tiny_model_factory):
    model = tiny_model_factory("fp16")
    cfg = TrainConfig(output_dir="x", optimizer="paged_adamw_8bit", lr=1e-2, warmup_ratio=0.0, precision="fp16")
    state = build_training_state(model, cfg, total_steps=10, device=CPU)
    scaler = state.scaler
    batch = collate(make_rows([20, 15], [4, 4]), 0)

    accumulate_gradients(model, [batch], scaler, "fp16", CPU, True, METER)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    _, skipped = optimizer_step(state, 1.0)
    assert skipped and scaler.get_scale() == scale / 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)

    accumulate_gradients(model, [batch], scaler, "fp16", CPU, True, METER)
    grad_norm, skipped = optimizer_step(state, 1.0)
    assert not skipped and math.isfinite(grad_norm)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


EIGHT_BIT = TrainConfig(output_dir="x", optimizer="paged_adamw_8bit", lr=1e-2, warmup_ratio=0.0, precision="fp32")


def take_steps(model, state, n):
    """n optimizer steps of one fixed batch; their gradient norms."""
    batch = collate(make_rows([20, 15], [4, 4]), 0)
    norms = []
    for _ in range(n):
        accumulate_gradients(model, [batch], state.scaler, "fp32", CPU, True, METER)
        norms.append(optimizer_step(state, 1.0)[0])
    return norms


def test_one_flat_tensor_steps_the_8bit_optimizer_as_the_adapters_one_by_one(tiny_model_factory):
    """r=64 on the tiny model: each adapter holds 4,096 weights, whole blocks of 8-bit state, so
    the optimizer steps one flat tensor (qlora/optim.py). Three steps leave the adapters as
    stepping them one by one does, bit for bit."""
    adapters, norms = [], []
    for flat in (True, False):
        model = tiny_model_factory("fp32", r=64)
        state = build_training_state(model, EIGHT_BIT, 10, CPU, flat=flat)
        assert (state.flat is not None) == flat and len(state.optimizer.param_groups[0]["params"]) == (1 if flat else 16)
        norms += take_steps(model, state, 3)  # clipped: the norm is summed adapter by adapter
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters())
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
    assert norms[:3] == norms[3:] and norms[0] > 1.0
    # r=16 (1,024 weights an adapter, 32-bit states in bitsandbytes) stays one tensor an adapter
    model = tiny_model_factory("fp32")
    assert build_training_state(model, EIGHT_BIT, 10, CPU).flat is None


@pytest.mark.parametrize("flat_first", [True, False])
def test_an_optimizer_state_moves_between_the_flat_and_the_per_adapter_layout_exactly(tiny_model_factory, flat_first):
    """A checkpoint's optimizer state, written flat (one tensor) or per adapter (model.shard, or
    before the flat optimizer), resumes in the other layout (qlora/optim.py, in_layout): two more
    steps there leave the adapters bit for bit as two more steps in the writing layout."""
    writer = tiny_model_factory("fp32", r=64)
    written = build_training_state(writer, EIGHT_BIT, 10, CPU, flat=flat_first)
    reader = tiny_model_factory("fp32", r=64)
    resumed = build_training_state(reader, EIGHT_BIT, 10, CPU, flat=not flat_first)
    resumed.optimizer.load_state_dict(in_layout(written.optimizer.state_dict(), resumed))  # before any step
    take_steps(writer, written, 2)
    for mine, theirs in zip(resumed.adapters, written.adapters):
        mine.data.copy_(theirs.data)
    saved = written.optimizer.state_dict()
    with pytest.raises(ValueError):  # the layouts differ
        resumed.optimizer.load_state_dict(saved)
    resumed.optimizer.load_state_dict(in_layout(saved, resumed))
    resumed.scheduler.load_state_dict(written.scheduler.state_dict())
    take_steps(writer, written, 2)
    take_steps(reader, resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(resumed.adapters, written.adapters))


def test_schedule_warmup_then_cosine_to_zero():
    """The learning rate of each of 200 steps against the schedule written out: ceil(3% of 200) = 6
    warmup steps from 0 (as HF TrainingArguments counts them), then a half cosine to 0."""
    cfg = TrainConfig(output_dir="x", lr=2e-4, warmup_ratio=0.03, optimizer="adamw", precision="fp32")
    model = torch.nn.Linear(2, 2)
    state = build_training_state(model, cfg, 200, CPU)
    expected = [2e-4 * s / 6 if s < 6 else 2e-4 * 0.5 * (1 + math.cos(math.pi * (s - 6) / 194)) for s in range(200)]
    lrs = []
    for _ in range(200):
        lrs.append(state.scheduler.get_last_lr()[0])
        state.optimizer.step(), state.scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[0] == 0 and max(lrs) == pytest.approx(2e-4) and lrs[-1] < 1e-7
    assert not state.scaler.is_enabled()  # loss scaling is for fp16 only
