"""The training state besides the weights: optimizer (bitsandbytes paged 8-bit AdamW by default),
warmup + cosine schedule, GradScaler, built together by `build_training_state`."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from transformers import get_cosine_schedule_with_warmup

from qlora.config import TrainConfig

# On a CPU, bitsandbytes warns at the first step (with its source line) that paging needs CUDA, then
# keeps the states in ordinary memory, which is all a CPU has: nothing for a user to act on.
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)

OPTIMIZERS = {
    # Paged: optimizer state lives in CUDA unified memory and is evicted to host RAM under pressure.
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "adamw_8bit": bnb.optim.AdamW8bit,
    "adamw": torch.optim.AdamW,
}


@dataclass(frozen=True)
class TrainingState:
    """What an optimizer step changes besides the adapter weights; a checkpoint saves all three."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def build_training_state(model: torch.nn.Module, cfg: TrainConfig, total_steps: int,
                         device: torch.device) -> TrainingState:
    """The optimizer over the trainable (LoRA) weights, its schedule over `total_steps`, and the
    loss scaler of cfg.precision."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)
    # Loss scaling is needed only for fp16 (its range underflows small gradients); disabled, the
    # scaler's calls pass through, so the step code is the same for every precision.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return TrainingState(optimizer=optimizer, scheduler=scheduler, scaler=scaler)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """As HF TrainingArguments computes it from warmup_ratio."""
    return math.ceil(total_steps * cfg.warmup_ratio)
