"""The memory estimate: the peak allocated bytes of one training step, predicted from config.json
and the config before anything loads (`train.py --estimate-memory`). qlora/memory.py measures;
this module predicts, and bench/memory.py compares the two on the GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qlora.batching import pack_length
from qlora.config import Config
from qlora.memory import size
from qlora.offload import INPUT_RELEASE_AFTER, RELEASE_AFTER
from qlora.offload import offloaded_layers as offloaded

# Logit positions kept by train.supervised_logits_only, as a share of a row's width: a position is
# kept when it predicts an answer token in *some* row of the batch, so the union over a batch of 4
# KorQuAD rows (about 1% of each row's positions) comes to about 2-4%; 2% held on the measured runs.
SUPERVISED_POSITIONS = 0.02
# Fitted on Llama-2-7B, one H200, compiled layers, bf16 norms, 30 points: batches of 4 rows of
# 512-2,048 tokens, padded or packed into one row, recompute all / 24 / 16 / 8 / none layers
# (bench/results/2026-11-28-session6-h200/memory-grid-llama2-7b-h200.json; estimate +1.5% to +4.9%
# over the measured peak at every point): a compiled layer saves 3% more than the
# tensors listed below; while the last kept layer runs its backward, three quarters of a layer's
# saved tensors more are live; recomputing a layer holds one and a half.
COMPILED_SAVED = 1.03
KEPT_WORKING = 0.75
RECOMPUTE_WORKING = 1.5
# Lean layers (model.lean_layers, qlora/lean.py) on CUDA, Llama-2-7B as shipped, one H200, 0, 4
# and 8 of 32 layers recomputed, the rest lean (bench/results/2026-11-29-session15-h200/call-d):
# each lean layer saved 0.3125 GiB at rows of 8,192: what the attention's backward needs (q, k, v
# and its output) and the residual (kept_saved's terms below, with the norms in the compute dtype
# as there; the dropout masks are replayed, not saved); while the last lean layer runs its
# backward, about a kept layer's saved tensors more are live (it recomputes its MLP there).
LEAN_WORKING = 1.0


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of the model, read from its config.json."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    """Gemma's heads are wider than hidden / heads."""
    tied: bool
    """One matrix for the embeddings and the LM head (Llama-3.2, Qwen3 small, Gemma)."""


def shape_of(hf_config: Any) -> Shape:
    heads = hf_config.num_attention_heads
    return Shape(vocab=hf_config.vocab_size, hidden=hf_config.hidden_size,
                 intermediate=hf_config.intermediate_size, layers=hf_config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
                 tied=bool(getattr(hf_config, "tie_word_embeddings", False)))


MODULE_DIMS = {  # (in, out) of each linear layer of a decoder block, as functions of the shape
    "q_proj": lambda s: (s.hidden, s.heads * s.head_dim),
    "k_proj": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "v_proj": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "o_proj": lambda s: (s.heads * s.head_dim, s.hidden),
    "gate_proj": lambda s: (s.hidden, s.intermediate),
    "up_proj": lambda s: (s.hidden, s.intermediate),
    "down_proj": lambda s: (s.intermediate, s.hidden),
}


def estimate_peak(shape: Shape, *, batch: int, seq: int, lora_r: int, targets: tuple[str, ...],
                  lora_dropout: bool, optimizer: str, recompute: bool, double_quant: bool,
                  logits_everywhere: bool, compute_bytes: int = 2, stream_bytes: int = 4,
                  recompute_layers: int | None = None, compiled: bool = False, shards: int = 1,
                  dequantized_layers: int = 0, offloaded_layers: int = 0, inputs_offloaded: bool = False,
                  lean: bool = False) -> dict[str, int]:
    """Predicted peak allocated bytes of one training step, by component.

    - quantized weights: 4 bits per weight + one absmax per 64 weights (8-bit with double
      quantization, fp32 without); in the first `dequantized_layers` layers, `compute_bytes` a
      weight instead (model.dequantized_layers);
    - embeddings, LM head and norms: `stream_bytes` each: fp32 as prepare_model_for_kbit_training
      upcasts them, or the compute dtype (model.upcast_non_quantized=false);
    - LoRA: fp32 weights + fp32 gradients; optimizer: 2 states of 1 byte (8-bit, + an fp32 absmax
      per 256) or 4 bytes (torch AdamW);
    - activations: the residual stream has the norms' dtype (fp32 norm weights promote it). One
      layer saves its matmul inputs, attention and MLP intermediates in the compute dtype, its norm
      outputs, and, with LoRA dropout, a dropped copy and a mask of the input of each adapted module
      (not when compiled: inductor regenerates the masks from the RNG state and recomputes the
      copies). A recomputed layer keeps only its input; the peak is the larger of the kept layers'
      saved tensors plus the backward's working set, and the layer being recomputed with its
      gradients (after the kept layers are freed). An offloaded layer (model.offload_layers) counts
      as a recomputed one, with more saved tensors where they can make the peak: the layers whose
      copies are still in flight while the first kept layers run forward (those within
      RELEASE_AFTER layers), and one layer brought back early beside a recompute. With their inputs
      offloaded (model.offload_inputs), the recomputing layers keep INPUT_RELEASE_AFTER + 1 inputs
      on the GPU at most (in flight in the forward; put back early, and the last layer's, in the
      backward). `lean` (model.lean_layers, compiled): the kept layers save what their attention's
      backward needs and the residual, and recompute the rest in the backward, where a kept layer's
      saved tensors more are live (LEAN_WORKING);
    - logits: fp32 [batch, positions, vocab] plus its gradient, at every position or only at the
      SUPERVISED_POSITIONS share;
    - sharded over `shards` ranks (model.shard, FSDP): each rank keeps 1/N of the packed 4-bit
      weights (their absmax lives in quant_state, outside FSDP, whole on every rank) and gathers
      two decoder layers at a time (one running, the next one's gather in flight); the root unit
      (embeddings, head, final norm) stays gathered, beside its own shard, from the first forward
      to the last backward; the LoRA weights, their gradients and the optimizer states are whole
      on every rank (README, Sharded QLoRA, for the runs it was checked on).
    """
    per_layer = [MODULE_DIMS[m](shape) for m in MODULE_DIMS]
    linear_params = shape.layers * sum(i * o for i, o in per_layer)
    absmax = 1 + 4 / 256 if double_quant else 4
    quantized = linear_params * 0.5 + linear_params / 64 * absmax
    quantized += min(dequantized_layers, shape.layers) * linear_params / shape.layers * (compute_bytes - 0.5 - absmax / 64)
    rest = (((1 if shape.tied else 2) * shape.vocab + (2 * shape.layers + 1)) * shape.hidden) * stream_bytes
    lora_params = shape.layers * sum(lora_r * sum(MODULE_DIMS[t](shape)) for t in targets)
    state_bytes = 2 * (1 + 4 / 256) if optimizer in ("paged_adamw_8bit", "adamw_8bit") else 8
    tokens = batch * seq
    kv, q = shape.kv_heads * shape.head_dim, shape.heads * shape.head_dim
    dropout_copies = (sum(MODULE_DIMS[t](shape)[0] for t in targets) * (stream_bytes + 1)
                      if lora_dropout and not compiled else 0)
    layer_saved = tokens * (compute_bytes * (3 * shape.hidden + q + 2 * kv + 3 * shape.intermediate)
                            + stream_bytes * 3 * shape.hidden + dropout_copies) * (COMPILED_SAVED if compiled else 1)
    residual = tokens * shape.hidden * stream_bytes
    recomputed = 0
    if recompute:
        recomputed = shape.layers if recompute_layers is None else min(recompute_layers, shape.layers)
    # the recomputed (first) layers keep their inputs; the kept layers' saved tensors are freed,
    # last layer first, before the first recompute needs room: the peak is the larger of the two
    kept = shape.layers - recomputed
    kept_saved = tokens * (compute_bytes * 2 * (q + kv) + stream_bytes * shape.hidden) \
        if lean else layer_saved  # what one kept layer saves
    working = (LEAN_WORKING if lean else KEPT_WORKING) * layer_saved
    live = max(kept * kept_saved + working if kept else 0,
               RECOMPUTE_WORKING * layer_saved if recomputed else 0)  # saved tensors at the peak
    if offloaded_layers and recomputed:  # spaced LEAD + 1 or more: one layer brought back early at a time
        picked = offloaded(recomputed, shape.layers, offloaded_layers)  # one line if too many
        in_flight = max(sum(i <= j < i + RELEASE_AFTER for j in picked) for i in picked)
        # two or more in flight: the forward of the layer between them runs beside both (every layer
        # recomputed, 10 of Mistral-7B's 32 offloaded, 3 apart: 1.7% above an estimate without it;
        # bench/results/2026-11-29-session13-h200/call-b)
        live = max(live, (RECOMPUTE_WORKING + 1) * layer_saved,
                   min(kept, RELEASE_AFTER - 1) * kept_saved + (in_flight + (in_flight > 1)) * layer_saved)
    inputs = min(recomputed, INPUT_RELEASE_AFTER + 1) if inputs_offloaded else recomputed
    activations = inputs * residual + live
    positions = seq if logits_everywhere else max(1, math.ceil(seq * SUPERVISED_POSITIONS))
    logits = batch * positions * shape.vocab * (compute_bytes + 4 + 4)
    # dequantizing one weight matrix for the matmul, forward and backward
    dequant = 2 * compute_bytes * max(i * o for i, o in per_layer)
    if shards > 1:  # the packed 4-bit bytes are sharded; their absmax (in quant_state, not a parameter) is not
        packed = linear_params * 0.5
        quantized = packed / shards + 2 * packed / shape.layers + (quantized - packed)
        rest *= 1 + 1 / shards  # the root unit gathered, and its own shard beside the gathered copy
    lora = lora_params * (4 + 4)  # fp32 weights and their gradient, whole on every rank (sharded too)
    optimizer_state = lora_params * state_bytes
    return {"quantized_weights": int(quantized), "embeddings_head_norms": int(rest),
            "lora_weights_and_grads": int(lora), "optimizer_state": int(optimizer_state),
            "activations": int(activations), "logits": int(logits), "dequant_workspace": dequant,
            "total": int(quantized + rest + lora + optimizer_state + activations + logits + dequant)}


def estimate_for_config(cfg: Config, hf_config: Any, seq: int, ranks: int = 1) -> dict[str, int]:
    """The estimate for one rank of a run of `cfg` on `ranks` processes whose longest batch is `seq`
    tokens wide (packed: one row of up to the pack length); the rank count matters only when the
    model is sharded."""
    batch = cfg.train.batch_size
    compute_bytes = 4 if cfg.train.precision == "fp32" else 2
    if cfg.data.packing:
        batch, seq = 1, pack_length(cfg.data, cfg.train)
    return estimate_peak(shape_of(hf_config), batch=batch, seq=seq, lora_r=cfg.lora.r,
                         targets=cfg.lora.target_modules, lora_dropout=cfg.lora.dropout > 0,
                         optimizer=cfg.train.optimizer,
                         recompute=cfg.model.recompute_activations,
                         recompute_layers=cfg.model.recompute_layers,
                         double_quant=cfg.model.double_quant,
                         logits_everywhere=not cfg.train.supervised_logits_only,
                         compute_bytes=compute_bytes,
                         stream_bytes=4 if cfg.model.upcast_non_quantized else compute_bytes,
                         compiled=cfg.model.compile_layers, shards=ranks if cfg.model.shard else 1,
                         dequantized_layers=cfg.model.dequantized_layers,
                         offloaded_layers=cfg.model.offload_layers, inputs_offloaded=cfg.model.offload_inputs,
                         lean=cfg.model.lean_layers)  # needs compile_layers: qlora/config.py


def format_estimate(estimate: dict[str, int]) -> str:
    return "\n".join(["estimated peak allocated:"] + [f"  {k:<28} {size(v)}" for k, v in estimate.items()])
