"""Where one optimizer step's time goes: torch.profiler over a step of our loop, after two warm-up
steps, printing the top operators by self CPU and by CUDA time.

    PYTHONPATH=.:bench python bench/profile_step.py --shape closed_book [config overrides...]
"""

from __future__ import annotations

import argparse

import torch
from compare_trl import SHAPES, run_steps, setup

from qlora.batching import data_order
from qlora.model import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--shape", choices=list(SHAPES), default="closed_book")
    p.add_argument("--config", default="configs/llama2-7b-korquad.yaml")
    args = p.parse_intermixed_args()
    cfg, tokenizer, data, device = setup(args.config, args.shape, args.overrides)
    model = build_model(cfg.model, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    order = data_order(data.rows, cfg.data, cfg.train, tokenizer.pad_token_id)
    run_steps(model, cfg, order, device, 2)  # warm-up (and compile)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        (record,) = run_steps(model, cfg, order, device, 1)
    # The step's wall time beside the profiler's totals: CUDA time well under it means the GPU waits
    # on the CPU (launches, Python) between kernels.
    print(f"step wall time {record['seconds']:.3f} s (profiled), {record['tokens']} tokens")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
