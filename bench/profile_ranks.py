"""Where each rank's step time goes under torchrun: compute kernels, NCCL kernels (the all-reduce,
including the time a rank waits in it for a slower one), and GPU idle (launch overhead, sync points).
Runs the loop's train_step on the real phases (config, data, model, DDP), a few warm-up steps, then
torch.profiler over the next steps; rank 0 prints one JSON line per rank.

    torchrun --nproc-per-node 2 bench/profile_ranks.py --config C [overrides...]
    python bench/profile_ranks.py --config C [overrides...]            # the one-GPU baseline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import load_model  # noqa: E402

from qlora import distributed  # noqa: E402
from qlora.batching import data_order, total_steps  # noqa: E402
from qlora.config import load_config  # noqa: E402
from qlora.data import prepare_data  # noqa: E402
from qlora.loop import StepSettings, train_step  # noqa: E402
from qlora.memory import MemoryMeter  # noqa: E402
from qlora.model import load_tokenizer  # noqa: E402
from qlora.optim import build_training_state  # noqa: E402
from qlora.prompts import build_prompter  # noqa: E402


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def kernel_times(prof: torch.profiler.profile) -> dict[str, float]:
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end, "nccl" in e.name.lower()) for e in kernels]
    return {"gpu_busy_s": busy_seconds([(s, e) for s, e, _ in spans]),
            "compute_s": busy_seconds([(s, e) for s, e, nccl in spans if not nccl]),
            "nccl_s": sum(e - s for s, e, nccl in spans if nccl) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, build_prompter(tokenizer, cfg.data.format, cfg.data.chat_template_kwargs),
                        cfg.train.seed)
    order = data_order(data.rows, cfg.data, cfg.train, tokenizer.pad_token_id)
    world, device = distributed.init(cfg.train.device)
    model = load_model(cfg, device, world)
    state = build_training_state(model, cfg.train, total_steps(cfg.train, len(data.rows)), device)
    trained = distributed.wrap(model, world, device)
    settings, meter = StepSettings.of(cfg.train, None, world), MemoryMeter(device)
    for step in range(1, args.warmup + 1):
        train_step(trained, order.batches(step - 1)[1], state, settings, device, meter, step)
    steps = range(args.warmup + 1, args.warmup + args.steps + 1)
    tokens = mine = 0
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        began = time.perf_counter()
        for step in steps:
            batches = order.batches(step - 1)[1]
            tokens += sum(b["n_tokens"] for b in batches)
            mine += sum(b["n_tokens"] for b in distributed.share(batches, world))
            train_step(trained, batches, state, settings, device, meter, step)  # ends in a sync
        wall = time.perf_counter() - began
    record = {"rank": world.rank, "world_size": world.size, "steps": list(steps), "wall_s": wall,
              "step_tokens": tokens, "rank_tokens": mine, **kernel_times(prof)}
    for line in distributed.gather_to_main(record, world) or []:  # only rank 0 prints
        print(json.dumps(line), flush=True)
    distributed.finish(world)


if __name__ == "__main__":
    main()
