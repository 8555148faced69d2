"""The model phase: BitsAndBytesConfig -> from_pretrained (4-bit NF4) -> prepare_model_for_kbit_training
(with activation recompute, a.k.a. gradient checkpointing) -> LoRA adapters (fp32) via peft -> the
speed and memory levers. The weights it reads come from the hub or a folder, or from
qlora/weights.py: random ones (model.random_init) or a sharded run's pre-quantized copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.attention import BOUNDED
from qlora.attention import register as register_attention
from qlora.config import LoraConfig, ModelConfig
from qlora.errors import UserError
from qlora.families import nearest_allowed, refusals
from qlora.offload import ActivationOffload, offloaded_layers
from qlora.weights import cached_4bit_copy, cached_random_model

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible")
    return torch.device(name)


def load_tokenizer(cfg: ModelConfig) -> Any:
    source = cfg.tokenizer or cfg.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {source!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {source!r} has no EOS token; answers could not be ended")
    if tokenizer.pad_token_id is None:
        # Llama-2 has no pad token. Padding is masked out of attention and labels, so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, precision: str, device: torch.device, seed: int,
                    quantized: bool = True) -> Any:
    """from_pretrained with the 4-bit NF4 BitsAndBytesConfig (plain `precision` weights when not
    `quantized`: evaluation with eval.quantized=false, merging). The model is in eval mode."""
    compute_dtype = DTYPES[precision]
    prepare_attention(cfg)
    path = base_weights(cfg, precision, seed, device, quantized)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant_config(cfg, precision) if quantized else None, dtype=compute_dtype,
            device_map={"": device}, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation)
    except OSError as e:
        raise UserError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None


def quant_config(cfg: ModelConfig, precision: str) -> BitsAndBytesConfig:
    # sharded (qlora/shard.py): the packed 4-bit bytes stored as the compute dtype, so that FSDP
    # flattens them with the layer's other frozen weights
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=DTYPES[precision],
                              bnb_4bit_quant_storage=DTYPES[precision] if cfg.shard else torch.uint8)


def build_model(cfg: ModelConfig, lora: LoraConfig, precision: str, device: torch.device,
                seed: int) -> PeftModel:
    # sharded: the 4-bit model loads into CPU memory and FSDP moves each layer to the GPU as it
    # shards it, so no GPU ever holds the whole model (37 GB for 70B)
    model = load_base_model(cfg, precision, torch.device("cpu") if cfg.shard else device, seed)
    # Casts the small non-quantized weights (norms, embeddings, head) to fp32 and turns on
    # recompute (either variant replays dropout with the saved RNG state); for reentrant recompute
    # it also makes the embeddings' output require grad, which that variant needs to backpropagate.
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=cfg.recompute_activations,
        gradient_checkpointing_kwargs={"use_reentrant": cfg.recompute_reentrant})
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same adapter at step 0
    model = get_peft_model(model, peft_cfg)
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            # GradScaler refuses to unscale fp16 gradients, and bf16 adapters lose small updates.
            p.data = p.data.float()
    apply_levers(model, cfg, precision)
    # from_pretrained leaves the model in eval mode: without this, recompute and dropout are off.
    model.train()
    return model


def apply_levers(model: PeftModel, cfg: ModelConfig, precision: str) -> None:
    """The config's speed and memory levers on a built model: attention kernel, which layers
    recompute, dequantized layers, compute-dtype norms, offloaded layers (`model.activation_offload`,
    None without), compiled layers. build_model calls it once; bench/compare_trl.py calls it again
    on one loaded model as it turns the levers on one after another. Dequantized layers,
    compute-dtype norms and compiled layers are one-way (a compiled layer may change backend: lean
    or not)."""
    prepare_attention(cfg)
    model.get_base_model().set_attn_implementation(cfg.attn_implementation)
    if cfg.recompute_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": cfg.recompute_reentrant})
        recompute_first_layers(model, cfg.recompute_layers)
    else:
        model.gradient_checkpointing_disable()
    # the layers that keep their activations, before offloading routes every layer through the
    # checkpoint's hook (offloaded layers are among the recomputing ones)
    kept = [i for i, layer in enumerate(decoder_layers(model)) if not layer.gradient_checkpointing]
    dequantize_first_layers(model, cfg.dequantized_layers)
    if not cfg.upcast_non_quantized:
        cast_frozen_fp32(model, DTYPES[precision])
    # after the casts and swaps: it records where the model's own tensors live (both keys need
    # recompute_activations: qlora/config.py)
    model.activation_offload = offload_some_layers(model, cfg.offload_layers, cfg.offload_inputs)
    if cfg.compile_layers:
        compile_decoder_layers(model, lean=kept if cfg.lean_layers else ())


def prepare_attention(cfg: ModelConfig) -> None:
    """Make "varlen" and "flex" known to transformers, and pick whether SDPA may use cuDNN
    (process-wide: every later SDPA call follows it)."""
    if cfg.attn_implementation in BOUNDED:
        register_attention()
    torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)


def compile_decoder_layers(model: torch.nn.Module, backend: str | Callable = "inductor",
                           lean: Collection[int] = ()) -> None:
    """Compile each decoder layer in place, LoRA included. Recompute stays outside the compiled code
    (GradientCheckpointingLayer.__call__ wraps the compiled call), so the recompute replays it.
    The layers numbered in `lean` (model.lean_layers: those that keep their activations) compile
    with qlora.lean's lean_inductor, the others with `backend` (torch.compile's: tests pass one that
    records the graphs). A layer already compiled with its backend is left as it is; dynamo keeps
    one graph a backend, shared by the layers that use it."""
    # Python floats (norm eps, LoRA scaling, dropout p) are constants: under dynamic=True dynamo would
    # pass each as a float64 CPU tensor, and inductor would compile a C++ kernel for their casts even
    # in a CUDA layer. That C++ kernel cost every process ~40 s of its first step (a compiler run and
    # inductor's CPU-ISA probes, each a Python subprocess), with a warm compile cache too (H200,
    # bench/results/2026-11-28-session10-h200/). Process-wide: these layers are our only compiled code.
    torch._dynamo.config.specialize_float = True
    from qlora.lean import lean_inductor  # imports inductor (1 s), which compiling needs anyway
    for i, layer in enumerate(decoder_layers(model)):
        wanted = lean_inductor if i in lean else backend
        if layer._compiled_call_impl is None or getattr(layer, "compiled_with", None) != wanted:
            layer.compile(dynamic=True, backend=wanted)
            layer.compiled_with = wanted


def decoder_layers(model: torch.nn.Module) -> list[GradientCheckpointingLayer]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def recompute_first_layers(model: torch.nn.Module, n: int | None) -> None:
    """Recompute only the first n decoder layers (None: all): the others keep their activations and
    skip the recompute (spare memory bought back as speed)."""
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = n is None or i < n


def offload_some_layers(model: torch.nn.Module, n: int, inputs: bool = False) -> ActivationOffload | None:
    """Make n of the recomputing layers offload their activations instead, and with `inputs` the
    others (below the last layer) keep their checkpointed input in host memory (qlora/offload.py).
    Every layer then runs through the offload's call, whose hooks start the copies back in the backward."""
    layers = decoder_layers(model)
    recomputed = sum(layer.gradient_checkpointing for layer in layers)  # the first ones
    offloaded = offloaded_layers(recomputed, len(layers), n) if n else []
    held = [i for i in range(min(recomputed, len(layers) - 1)) if i not in offloaded] if inputs else []
    if not offloaded and not held:
        return None
    device = next(model.parameters()).device
    offload = ActivationOffload(model, offloaded, len(layers), device, held)
    for i, layer in enumerate(layers):
        inner = layer._gradient_checkpointing_func if layer.gradient_checkpointing else call_directly
        layer.gradient_checkpointing = True  # GradientCheckpointingLayer.__call__ runs the function below
        layer._gradient_checkpointing_func = offload.call(i, inner)
    return offload


def call_directly(forward: Callable[..., Any], *args: Any) -> Any:
    return forward(*args)


class DequantizedLinear(torch.nn.Module):
    """A 4-bit linear layer with its weight dequantized once: what bitsandbytes' Linear4bit computes
    (input cast to its compute dtype, matmul with the dequantized weight, output cast back), without
    dequantizing in every forward and backward. The weight is frozen (LoRA trains beside it)."""

    def __init__(self, layer: bnb.nn.Linear4bit):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        dtype = layer.compute_dtype or layer.weight.quant_state.dtype
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def dequantize_first_layers(model: torch.nn.Module, n: int) -> None:
    """Swap the 4-bit base of every adapted and plain linear layer in the first n decoder layers
    for its DequantizedLinear. Memory: each weight goes from half a byte (and its absmax) to the
    compute dtype's bytes; the 4-bit copy is freed with the module."""
    for layer in decoder_layers(model)[:n]:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, bnb.nn.Linear4bit):
                    setattr(parent, name, DequantizedLinear(child))


def cast_frozen_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the frozen norms, embeddings and head:
    fp32 norm weights promote the whole residual stream to fp32, doubling what each recomputed
    layer keeps and adding casts. Trainable (LoRA) weights stay fp32."""
    for p in model.parameters():
        if p.dtype == torch.float32 and not p.requires_grad:
            p.data = p.data.to(dtype)


def load_for_inference(cfg: ModelConfig, precision: str, device: torch.device, seed: int,
                       adapter: Path | None, quantized: bool = True) -> Any:
    """The base model as in training, with the saved adapter applied (or none), in eval mode."""
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no adapter in {adapter} (expected adapter_config.json, e.g. RUN/final)")
    model = load_base_model(for_inference(cfg), precision, device, seed, quantized)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def for_inference(cfg: ModelConfig) -> ModelConfig:
    """varlen and flex attention know no left padding: generation runs SDPA, or the nearest the model
    allows (eager for Gemma-2's soft-cap). The weights are the same."""
    if cfg.attn_implementation not in BOUNDED:
        return cfg
    return nearest_allowed(dataclasses.replace(cfg, attn_implementation="sdpa"), read_architecture(cfg))


def merge_adapter(cfg: ModelConfig, adapter: Path, out: Path, precision: str, seed: int) -> Path:
    """Fold the adapter into unquantized base weights (merging into 4-bit weights would round the
    update away) and save a standalone model that plain transformers loads."""
    model = load_for_inference(cfg, precision, torch.device("cpu"), seed, adapter, quantized=False)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    return out


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as stored elements x 2."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return trainable, total


def read_architecture(cfg: ModelConfig) -> Any:
    """The model's config.json (from `arch`, else `name`): shapes for random_init and the memory
    estimate, without loading weights."""
    arch = cfg.arch or cfg.name
    try:
        return AutoConfig.from_pretrained(arch, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the architecture of {arch!r}: {str(e).splitlines()[0]}") from None


def base_weights(cfg: ModelConfig, precision: str, seed: int, device: torch.device,
                 quantized: bool = True) -> str | Path:
    """Where from_pretrained reads the base model (qlora/weights.py), written once where it is a
    folder of ours: random weights (model.random_init) for the architecture in `cfg.arch or
    cfg.name`; a sharded 4-bit run's weights pre-quantized (every rank maps them instead of
    quantizing the whole model on its CPU; 70B's bf16 form, 138 GB, is never written); else
    `cfg.name`. Random bf16 and 4-bit forms hold the same weights: the bf16 one quantizes on load
    to the 4-bit one's bytes. A model or lever this architecture rules out (qlora/families.py) is
    refused first, before anything is written or loaded."""
    architecture = read_architecture(cfg)
    refused = refusals(cfg, architecture)
    if refused:
        raise UserError("; ".join(refused))
    four_bit = quant_config(cfg, precision) if cfg.shard and quantized else None
    if cfg.random_init:
        return cached_random_model(architecture, seed, device, cfg.random_init_cache, four_bit, cfg.trust_remote_code)
    if four_bit is not None:
        return cached_4bit_copy(cfg.name, architecture, device, cfg.random_init_cache, four_bit, cfg.trust_remote_code)
    return cfg.name
