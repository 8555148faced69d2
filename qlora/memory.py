"""Where the memory goes: per-phase peaks each step, a start-up breakdown, a snapshot for
pytorch.org/memory_viz, and an estimate made before anything loads.

On CUDA the numbers come from the caching allocator (`torch.cuda.memory_stats`), which counts an
allocation when the kernel using it is queued: reading it needs no device sync. On CPU only the
process RSS is known; the CUDA fields are None.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from qlora.batching import pack_length
from qlora.config import Config

GIB = 1024 ** 3
PHASES = ("forward", "backward", "optimizer")


def _proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its high-water mark) from the same kernel counters, so the
    peak is never below the current value."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    return _proc_status_bytes("VmHWM")


class MemoryMeter:
    """Peak allocated memory per phase of the current step. `phase` resets the allocator's peak
    counters on entry and keeps the largest peak seen on exit, so forward, backward and optimizer
    peaks are told apart even though micro-batches interleave forward and backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._peaks: dict[str, int] = {}
        self._active_peak = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.cuda:
            stats = torch.cuda.memory_stats(self.device)
            self._peaks[name] = max(self._peaks.get(name, 0), stats["allocated_bytes.all.peak"])
            self._active_peak = max(self._active_peak, stats["active_bytes.all.peak"])

    def step_record(self) -> dict[str, Any]:
        """The `mem` object of one metrics line; starts the next step's peaks from zero."""
        record: dict[str, Any] = {"rss_gib": _rss_bytes() / GIB, "peak_rss_gib": _peak_rss_bytes() / GIB}
        if self.cuda:
            stats = torch.cuda.memory_stats(self.device)
            record.update({
                "allocated_gib": stats["allocated_bytes.all.current"] / GIB,
                "reserved_gib": stats["reserved_bytes.all.current"] / GIB,
                **{f"peak_{p}_gib": self._peaks.get(p, 0) / GIB for p in PHASES},
                "peak_active_gib": self._active_peak / GIB,
                "alloc_retries": stats.get("num_alloc_retries", 0),
                "ooms": stats.get("num_ooms", 0)})
        else:
            record.update({"allocated_gib": None, "reserved_gib": None,
                           **{f"peak_{p}_gib": None for p in PHASES},
                           "peak_active_gib": None, "alloc_retries": None, "ooms": None})
        self._peaks, self._active_peak = {}, 0
        return record


def step_peak_gib(mem: dict[str, Any]) -> float | None:
    """The largest per-phase peak of one step's `mem` record (None on CPU)."""
    return None if mem["peak_forward_gib"] is None else max(mem[f"peak_{p}_gib"] for p in PHASES)


def memory_line(device: torch.device) -> str:
    """One line of where memory stands now (for error messages)."""
    if device.type != "cuda":
        return f"process RSS {_rss_bytes() / GIB:.2f} GiB (peak {_peak_rss_bytes() / GIB:.2f})"
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    gib = lambda key: stats.get(key, 0) / GIB  # noqa: E731
    return (f"allocated {gib('allocated_bytes.all.current'):.2f} GiB (peak {gib('allocated_bytes.all.peak'):.2f}), "
            f"reserved {gib('reserved_bytes.all.current'):.2f} GiB, device {(total - free) / GIB:.2f} of "
            f"{total / GIB:.2f} GiB in use, {stats.get('num_alloc_retries', 0)} allocation retries")


# ---------------------------------------------------------------- start-up breakdown

def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def is_paged(t: torch.Tensor) -> bool:
    """bitsandbytes marks its paged (CUDA unified memory) buffers with `is_paged`."""
    return bool(getattr(t, "is_paged", False))


def startup_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      device: torch.device) -> dict[str, Any]:
    """Bytes by owner, measured after the first optimizer step (when optimizer states exist).
    On CUDA the rows add up to what the device has in use:
    base + adapters + optimizer (device part) + other allocations + reserved gap + CUDA context."""
    params = list(model.parameters())
    adapters = [p for p in params if p.requires_grad]
    adapter_ids = {id(p) for p in adapters}
    base = [p for p in params if id(p) not in adapter_ids] + list(model.buffers())
    # 4-bit weights keep their quantization constants (absmax, double-quant codebook) outside the
    # parameter: count them with the base weights
    quant_consts = [t for m in model.modules() for t in _quant_state_tensors(m)]
    states = optimizer_state_tensors(optimizer)
    rows = {"base_weights": tensor_bytes(iter(base)) + tensor_bytes(iter(quant_consts)),
            "lora_adapters": tensor_bytes(iter(adapters)),
            "optimizer_state_device": tensor_bytes(t for t in states if not is_paged(t)),
            "optimizer_state_paged": tensor_bytes(t for t in states if is_paged(t))}
    out: dict[str, Any] = {"device": str(device), "bytes": rows}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        allocated, reserved = stats["allocated_bytes.all.current"], stats["reserved_bytes.all.current"]
        known = rows["base_weights"] + rows["lora_adapters"] + rows["optimizer_state_device"]
        rows["other_allocated"] = allocated - known  # gradients freed by zero_grad, buffers, workspaces
        rows["reserved_unallocated"] = reserved - allocated  # the caching allocator's gap
        rows["cuda_context_and_other"] = (total - free) - reserved  # CUDA context, cuBLAS, NCCL...
        out.update({"device_total": total, "device_in_use": total - free})
    else:
        out["rss"] = _rss_bytes()
    return out


def _quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return []
    found = [state.absmax, getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [nested.absmax, nested.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def format_breakdown(breakdown: dict[str, Any]) -> str:
    lines = [f"memory after the first step on {breakdown['device']}:"]
    lines += [f"  {name:<26} {size(value)}" for name, value in breakdown["bytes"].items()]
    if "device_in_use" in breakdown:
        lines.append(f"  {'= device in use':<26} {size(breakdown['device_in_use'])}"
                     f" of {size(breakdown['device_total'])}")
    else:
        lines.append(f"  {'process RSS':<26} {size(breakdown['rss'])}")
    return "\n".join(lines)


def size(n: int) -> str:
    return f"{n / GIB:9.3f} GiB" if abs(n) >= GIB else f"{n / 2**20:9.3f} MiB"


def write_breakdown(breakdown: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "memory.json").write_text(json.dumps(breakdown, indent=1))


# ---------------------------------------------------------------- snapshots for memory_viz

def start_history(steps: int, device: torch.device) -> bool:
    """Record every allocation with its stack for the first `steps` steps (costly; off when 0)."""
    if steps <= 0 or device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    return True


def dump_history(path: Path) -> None:
    """Write the snapshot (a pickle that pytorch.org/memory_viz opens) and stop recording."""
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


# ---------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class Shape:
    """What the estimate needs of the model, read from its config.json."""
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


def shape_of(hf_config: Any) -> Shape:
    return Shape(vocab=hf_config.vocab_size, hidden=hf_config.hidden_size,
                 intermediate=hf_config.intermediate_size, layers=hf_config.num_hidden_layers,
                 heads=hf_config.num_attention_heads,
                 kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)


MODULE_DIMS = {  # (in, out) of each linear layer of a Llama block, as functions of the shape
    "q_proj": lambda s: (s.hidden, s.hidden),
    "k_proj": lambda s: (s.hidden, s.hidden * s.kv_heads // s.heads),
    "v_proj": lambda s: (s.hidden, s.hidden * s.kv_heads // s.heads),
    "o_proj": lambda s: (s.hidden, s.hidden),
    "gate_proj": lambda s: (s.hidden, s.intermediate),
    "up_proj": lambda s: (s.hidden, s.intermediate),
    "down_proj": lambda s: (s.intermediate, s.hidden),
}


def estimate_peak(shape: Shape, *, batch: int, seq: int, lora_r: int, targets: tuple[str, ...],
                  lora_dropout: bool, optimizer: str, checkpointing: bool, double_quant: bool,
                  logits_everywhere: bool, compute_bytes: int = 2,
                  checkpoint_layers: int | None = None) -> dict[str, int]:
    """Predicted peak allocated bytes of one training step, by component.

    - quantized weights: 4 bits per weight + one absmax per 64 weights (8-bit with double
      quantization, fp32 without);
    - embeddings, LM head and norms: fp32 (prepare_model_for_kbit_training upcasts them);
    - LoRA: fp32 weights + fp32 gradients; optimizer: 2 states of 1 byte (8-bit, + an fp32 absmax
      per 256) or 4 bytes (torch AdamW);
    - activations: the residual stream is fp32 (fp32 norm weights promote it). One layer saves its
      matmul inputs, attention and MLP intermediates in the compute dtype, its fp32 norm outputs,
      and, with LoRA dropout, an fp32 dropped copy and a mask of the input of each adapted module.
      With checkpointing every checkpointed layer keeps only its fp32 input (the others all their
      saved tensors), and the layer being recomputed adds its saved tensors plus about half again
      for their gradients (fitted on Llama-2-7B, H200); without, every layer keeps its saved tensors;
    - logits: fp32 [batch, positions, vocab] plus its gradient, at every position or only at
      supervised ones (~1% of them for KorQuAD answers).
    """
    per_layer = [MODULE_DIMS[m](shape) for m in MODULE_DIMS]
    linear_params = shape.layers * sum(i * o for i, o in per_layer)
    absmax = 1 + 4 / 256 if double_quant else 4
    quantized = linear_params * 0.5 + linear_params / 64 * absmax
    fp32_rest = (2 * shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden) * 4
    lora_params = shape.layers * sum(lora_r * sum(MODULE_DIMS[t](shape)) for t in targets)
    state_bytes = 2 * (1 + 4 / 256) if optimizer in ("paged_adamw_8bit", "adamw_8bit") else 8
    tokens = batch * seq
    kv = shape.hidden * shape.kv_heads // shape.heads
    dropout_copies = sum(MODULE_DIMS[t](shape)[0] for t in targets) * (4 + 1) if lora_dropout else 0
    layer_saved = tokens * (compute_bytes * (4 * shape.hidden + 2 * kv + 3 * shape.intermediate)
                            + 4 * 3 * shape.hidden + dropout_copies)
    residual = tokens * shape.hidden * 4
    if checkpointing:
        kept = shape.layers if checkpoint_layers is None else min(checkpoint_layers, shape.layers)
        activations = kept * residual + (shape.layers - kept) * layer_saved + 1.5 * layer_saved
    else:
        activations = shape.layers * layer_saved + residual
    positions = seq if logits_everywhere else max(1, math.ceil(seq * 0.02))
    logits = batch * positions * shape.vocab * (compute_bytes + 4 + 4)
    # dequantizing one weight matrix for the matmul, forward and backward
    dequant = 2 * compute_bytes * max(i * o for i, o in per_layer)
    return {"quantized_weights": int(quantized), "fp32_embeddings_head_norms": int(fp32_rest),
            "lora_weights_and_grads": lora_params * 8, "optimizer_state": int(lora_params * state_bytes),
            "activations": int(activations), "logits": int(logits), "dequant_workspace": dequant,
            "total": int(quantized + fp32_rest + lora_params * (8 + state_bytes) + activations + logits + dequant)}


def estimate_for_config(cfg: Config, hf_config: Any, seq: int) -> dict[str, int]:
    """The estimate for a run of `cfg` whose longest batch is `seq` tokens wide (packed: one row
    of up to the pack length)."""
    batch = cfg.train.batch_size
    if cfg.data.packing:
        batch, seq = 1, pack_length(cfg.data, cfg.train)
    return estimate_peak(shape_of(hf_config), batch=batch, seq=seq, lora_r=cfg.lora.r,
                         targets=cfg.lora.target_modules, lora_dropout=cfg.lora.dropout > 0,
                         optimizer=cfg.train.optimizer,
                         checkpointing=cfg.model.gradient_checkpointing,
                         checkpoint_layers=cfg.model.checkpoint_layers,
                         double_quant=cfg.model.double_quant,
                         logits_everywhere=not cfg.train.supervised_logits_only,
                         compute_bytes=4 if cfg.train.precision == "fp32" else 2)


def format_estimate(estimate: dict[str, int]) -> str:
    return "\n".join(["estimated peak allocated:"] + [f"  {k:<28} {size(v)}" for k, v in estimate.items()])
