"""Where one optimizer step's time goes: torch.profiler over a step of our loop, after two warm-up
steps, printing the top operators by self CPU and by CUDA time.

    python bench/profile_step.py --shape closed_book [config overrides...]
"""

from __future__ import annotations

import argparse

import torch
from compare_trl import SHAPES, setup

from qlora.batching import data_order
from qlora.loop import optimizer_step, train_step
from qlora.memory import MemoryMeter
from qlora.model import build_model
from qlora.optim import build_optimizer, build_scaler, build_scheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--shape", choices=list(SHAPES), default="closed_book")
    args = p.parse_intermixed_args()
    cfg, tokenizer, data, device = setup(args.shape, args.overrides)
    t = cfg.train
    model = build_model(cfg.model, cfg.lora, t.precision, device, t.seed)
    order = data_order(data.rows, cfg.data, t, tokenizer.pad_token_id)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, 10)
    scaler = build_scaler(t.precision, device)
    meter = MemoryMeter(device)

    def step(i: int) -> None:
        _, batches = order.batches(i)
        loss = train_step(model, batches, scaler, t.precision, device, t.supervised_logits_only, meter)
        optimizer_step(model, optimizer, scheduler, scaler, t.max_grad_norm)
        float(loss)

    step(0), step(1)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step(2)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
