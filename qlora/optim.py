"""Optimizer (bitsandbytes paged 8-bit AdamW by default), warmup + cosine schedule, GradScaler."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from transformers import get_cosine_schedule_with_warmup

from qlora.config import TrainConfig

OPTIMIZERS = {
    # Paged: optimizer state lives in CUDA unified memory and is evicted to host RAM under pressure.
    "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
    "adamw_8bit": bnb.optim.AdamW8bit,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """As HF TrainingArguments computes it from warmup_ratio."""
    return math.ceil(total_steps * cfg.warmup_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to lr, then a half cosine down to 0 at `total_steps`."""
    return get_cosine_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling is needed only for fp16 (its range underflows small gradients); disabled, the
    scaler's calls pass through, so the step code is the same for every precision."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
