"""The training state besides the weights: optimizer (bitsandbytes paged 8-bit AdamW by default),
warmup + cosine schedule, GradScaler, built together by `build_training_state`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import bitsandbytes as bnb
import torch
from transformers import get_cosine_schedule_with_warmup

from qlora.config import TrainConfig
from qlora.errors import UserError

# On a CPU, bitsandbytes warns at the first step (with its source line) that paging needs CUDA, then
# keeps the states in ordinary memory, which is all a CPU has: nothing for a user to act on.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)

OPTIMIZERS = {
    # Paged: optimizer state lives in CUDA unified memory and is evicted to host RAM under pressure.
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "adamw_8bit": bnb.optim.AdamW8bit,
    "adamw": torch.optim.AdamW,
}


STATE_BLOCK, MIN_8BIT = 256, 4096
"""bitsandbytes' 8-bit optimizers quantize their two states in blocks of 256 values, each block
with its own scale, and keep a tensor of fewer than 4,096 values in 32-bit states instead."""


@dataclass(frozen=True)
class TrainingState:
    """What an optimizer step changes besides the adapter weights; a checkpoint saves all three."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    adapters: tuple[torch.nn.Parameter, ...] = ()
    """The trainable weights, in the model's order."""
    flat: torch.nn.Parameter | None = None
    """The adapters as one tensor, which the optimizer steps instead of them (see flatten)."""

    def collect_gradients(self) -> None:
        """The adapters' gradients into the flat tensor's (one copy kernel, and a second copy of
        the gradients until zero_grad), before unscaling."""
        if self.flat is None:
            return
        missing = next((i for i, p in enumerate(self.adapters) if p.grad is None), None)
        if missing is not None:  # bitsandbytes would skip that tensor; one flat tensor cannot
            raise UserError(f"adapter weight {missing} got no gradient this step: every adapted module must be "
                            f"used in the forward (check lora.target_modules)")
        self.flat.grad = torch.cat([p.grad.reshape(-1) for p in self.adapters])

    @property
    def stepped(self) -> tuple[torch.nn.Parameter, ...]:
        """What the optimizer steps: the flat tensor, or the adapters one by one."""
        return self.adapters if self.flat is None else (self.flat,)

    def gradients(self) -> list[torch.Tensor]:
        """The optimizer's gradients one tensor an adapter (views into the flat one's), so that
        clipping sums the norm as it does over separate adapters."""
        if self.flat is None:
            return [p.grad for p in self.adapters if p.grad is not None]
        return list(self.flat.grad.split([p.numel() for p in self.adapters]))

    def zero_grad(self) -> None:
        """Frees the gradients (set to None, not zeroed) until the next backward: the optimizer's,
        and the adapters' own where the flat tensor's are a copy of them."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.flat is not None:
            for p in self.adapters:
                p.grad = None


def build_training_state(model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                         device: torch.device, flat: bool = True) -> TrainingState:
    """The optimizer over the trainable (LoRA) weights, flattened where that changes no number
    (`flat`: may, see `flatten`), its schedule over `total_steps`, and the loss scaler of
    cfg.precision."""
    params = tuple(p for p in model.parameters() if p.requires_grad)
    flat_param = flatten(params) if flat and flattens_exactly(cfg.optimizer, params) else None
    stepped = params if flat_param is None else (flat_param,)
    optimizer = OPTIMIZERS[cfg.optimizer](list(stepped), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)
    # Loss scaling is needed only for fp16 (its range underflows small gradients); disabled, the
    # scaler's calls pass through, so the step code is the same for every precision.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return TrainingState(optimizer=optimizer, scheduler=scheduler, scaler=scaler, adapters=params, flat=flat_param)


def flattens_exactly(optimizer: str, params: tuple[torch.nn.Parameter, ...]) -> bool:
    """bitsandbytes' optimizers update one tensor at a time and wait for the GPU after each
    (`torch.cuda.synchronize()` in Optimizer8bit.step): 256 waits a step for Llama-2-7B's adapters,
    49.6 ms of CPU time in `Optimizer.step` (H200, session 10's profile). One flat tensor makes it
    one update and one wait. The updates are the same numbers when every adapter fills whole
    blocks of 8-bit state, so that no block spans two of them (tests/test_loop.py checks it bit for
    bit); otherwise they stay separate. torch's AdamW needs none of it: it updates all tensors
    together and never waits. The flat state (16.8M values for Llama-2-7B r=16) is paged by the
    paged optimizers, as every state tensor of 1e5 values or more is."""
    return (issubclass(OPTIMIZERS[optimizer], bnb.optim.optimizer.Optimizer8bit) and len(params) > 1
            and all(p.numel() % STATE_BLOCK == 0 and p.numel() >= MIN_8BIT for p in params)
            and len({(p.device, p.dtype) for p in params}) == 1)


def flatten(params: tuple[torch.nn.Parameter, ...]) -> torch.nn.Parameter:
    """One parameter holding `params` end to end; each of them becomes a view into it (its
    `.data` replaced, the Parameter object kept: the model, DDP and the checkpoints still see
    each weight by its name). Memory: the same bytes, moved once."""
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    offset = 0
    for p in params:
        p.data = flat.data[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """As HF TrainingArguments computes it from warmup_ratio."""
    return math.ceil(total_steps * cfg.warmup_ratio)


BNB_STATE = bnb.optim.optimizer.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY
"""Where bitsandbytes' optimizer state_dict nests a tensor's 8-bit states."""
VALUES_PER_ENTRY = {"state1": 1, "state2": 1, "absmax1": STATE_BLOCK, "absmax2": STATE_BLOCK}
"""Adapter weights per entry of each per-weight state tensor (the rest, the codebooks, are shared)."""


def in_layout(saved: dict[str, Any], state: TrainingState) -> dict[str, Any]:
    """An optimizer state_dict as a checkpoint holds it (loaded onto this run's device), written with
    the adapters as one flat tensor or one by one (under model.shard, or by a version before the
    flat optimizer), in the layout of `state`'s optimizer: exact both ways, as no 8-bit block spans
    two adapters. Raises ValueError where the states cannot be the adapters' (other sizes, or steps
    that differ); anything else comes back as it is (the optimizer's load_state_dict then says what
    does not fit)."""
    now, groups = 1 if state.flat is not None else len(state.adapters), saved["param_groups"]
    if len(groups) != 1 or sorted({len(groups[0]["params"]), now}) != [1, len(state.adapters)]:
        return saved
    group = {**groups[0], "params": list(range(now))}
    if not saved["state"]:  # written before any optimizer step was taken (GradScaler skipped them all)
        return {"state": {}, "param_groups": [group]}
    states = [saved["state"].get(i, {}) for i in groups[0]["params"]]
    if any(set(s) != {"step", BNB_STATE} or not set(VALUES_PER_ENTRY) <= set(s[BNB_STATE]) for s in states):
        return saved  # states that are not all 8-bit: not written by a flattening run's counterpart
    sizes = [p.numel() for p in state.adapters]
    if [s[BNB_STATE]["state1"].numel() for s in states] not in ([sum(sizes)], sizes):
        raise ValueError("its 8-bit states are not the sizes of this run's adapters")
    if len({s["step"] for s in states}) > 1:
        raise ValueError("its adapters took different numbers of steps (one with no gradient was skipped), "
                         "so they cannot be stepped as one tensor")
    converted = [_joined(states)] if now == 1 else _split(states[0], state.adapters)
    return {"state": dict(enumerate(converted)), "param_groups": [group]}


def _joined(states: list[dict[str, Any]]) -> dict[str, Any]:
    quant = {key: torch.cat([s[BNB_STATE][key].reshape(-1) for s in states]) if key in VALUES_PER_ENTRY else value
             for key, value in states[0][BNB_STATE].items()}
    return {"step": states[0]["step"], BNB_STATE: quant}


def _split(flat_state: dict[str, Any], adapters: tuple[torch.nn.Parameter, ...]) -> list[dict[str, Any]]:
    """Copies, not views: a view would keep the whole flat buffer alive beside every adapter's."""
    out, offset = [], 0
    for p in adapters:
        quant = {}
        for key, value in flat_state[BNB_STATE].items():
            per = VALUES_PER_ENTRY.get(key)
            part = value if per is None else value[offset // per:(offset + p.numel()) // per].clone()
            quant[key] = part.view_as(p) if per == 1 else part
        out.append({"step": flat_state["step"], BNB_STATE: quant})
        offset += p.numel()
    return out
