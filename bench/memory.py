"""Peak memory of one training step at fixed shapes, beside the estimate (issue: memory audit).

Loads the model once (random_init in the given config), then for each norm dtype (fp32 first: the
cast to the compute dtype is one-way), max length, layout (a padded batch of the longest KorQuAD
rows cut to exactly that length, or the same rows packed into one row) and recompute count (all,
N first layers, none) runs two optimizer steps and records peak allocated and reserved memory
beside the estimate.

    python bench/memory.py --config configs/llama2-7b-korquad.yaml model.random_init=true \
        model.tokenizer=.devdata/tokenizer data.source=.devdata/KorQuAD_v1.0_dev.json \
        --lengths 512 1024 2048 --recompute all 16 none --layouts padded packed --norms fp32 bf16 \
        --out bench/results/memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from qlora import use_expandable_segments

use_expandable_segments()  # before torch touches CUDA

import torch  # noqa: E402

from qlora.batching import collate, collate_packed  # noqa: E402
from qlora.config import Config, load_config  # noqa: E402
from qlora.data import Encoded, encode_example, load_examples  # noqa: E402
from qlora.prompts import build_prompter  # noqa: E402
from qlora.estimate import estimate_for_config  # noqa: E402
from qlora.loop import StepSettings, train_step  # noqa: E402
from qlora.memory import GIB, MemoryMeter, step_peak_gib  # noqa: E402
from qlora.model import apply_levers, build_model, load_tokenizer, read_architecture, resolve_device  # noqa: E402
from qlora.optim import build_training_state  # noqa: E402


def longest_rows(cfg: Config, tokenizer: Any, length: int, batch: int) -> list[Encoded]:
    """The `batch` examples with the longest contexts, encoded at max length `length`."""
    examples = sorted(load_examples(cfg.data.source), key=lambda e: -len(e.context))
    prompter = build_prompter(tokenizer, "extractive")
    rows = [r for r in (encode_example(e, prompter, length) for e in examples[:batch * 4]) if r]
    return rows[:batch]


def measure(model: Any, cfg: Config, device: torch.device, batch: dict[str, Any]) -> dict[str, float]:
    """Peak allocated (per phase, the largest) and reserved memory over two optimizer steps of
    train.py's train_step on `batch`, with cfg's levers applied to the loaded model."""
    apply_levers(model, cfg.model, cfg.train.precision)
    state = build_training_state(model, cfg.train, 10, device)
    settings = StepSettings.of(cfg.train)
    meter = MemoryMeter(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    peaks = []
    for step in (1, 2):
        train_step(model, [batch], state, settings, device, meter, step)
        peaks.append(step_peak_gib(meter.step_record()))
    reserved = torch.cuda.max_memory_reserved(device) / GIB
    del state
    return {"peak_allocated_gib": max(peaks), "peak_reserved_gib": reserved}


def variant(cfg: Config, norms: str, layout: str, recompute: str, width: int) -> Config:
    """cfg with one grid point's norm dtype, recompute count and layout (packed: one row of `width`)."""
    model = dataclasses.replace(cfg.model, upcast_non_quantized=norms == "fp32",
                                recompute_activations=recompute != "none",
                                recompute_layers=None if recompute in ("all", "none") else int(recompute))
    data = dataclasses.replace(cfg.data, packing=layout == "packed", pack_length=width if layout == "packed" else None)
    return dataclasses.replace(cfg, model=model, data=data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--recompute", nargs="+", default=["all", "none"], help="all, none, or a count of first layers")
    p.add_argument("--layouts", nargs="+", choices=["padded", "packed"], default=["padded"])
    p.add_argument("--norms", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="fp32: model.upcast_non_quantized=true; bf16: false (the compute dtype). fp32 first")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model)
    # fp32 norms only while the model still has them: the cast to the compute dtype is one-way
    built = dataclasses.replace(cfg.model, upcast_non_quantized="fp32" in args.norms)
    model = build_model(built, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    hf_config = read_architecture(cfg.model)
    results = []
    norm_order = sorted(set(args.norms), key=lambda n: n != "fp32")  # fp32 first: the cast is one-way
    for norms, length, layout, recompute in itertools.product(norm_order, args.lengths, args.layouts, args.recompute):
        rows = longest_rows(cfg, tokenizer, length, cfg.train.batch_size)
        batch = collate(rows, tokenizer.pad_token_id) if layout == "padded" else collate_packed(rows)
        batch["stream_capacity"] = batch["input_ids"].numel()  # as DataOrder's: flex pads to no more
        width = batch["input_ids"].shape[1]
        shaped = variant(cfg, norms, layout, recompute, width)
        estimate = estimate_for_config(shaped, hf_config, seq=width)["total"] / GIB
        row = {"norms": norms, "max_length": length, "layout": layout, "width": width, "rows": len(rows),
               "recompute": recompute, **measure(model, shaped, device, batch), "estimate_gib": estimate}
        row["estimate_error_pct"] = 100 * (estimate - row["peak_allocated_gib"]) / row["peak_allocated_gib"]
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "command": " ".join(sys.argv), "precision": cfg.train.precision,
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
