"""QLoRA fine-tuning, phase by phase: config -> data -> model -> optimizer -> loop -> save.

    python train.py --config configs/tiny.yaml [section.key=value ...] [--overwrite]
    python train.py --config configs/tiny.yaml --resume [CHECKPOINT_DIR]
    python train.py --config configs/tiny.yaml --inspect-data 3 [--json]

Each phase is one call into qlora/; set a breakpoint on any line below and step in.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from qlora import use_expandable_segments

use_expandable_segments()  # before torch touches CUDA

import torch  # noqa: E402

from qlora.batching import data_order, total_steps
from qlora.checkpoint import (Checkpoint, check_compatible, check_output_dir, data_fingerprint, find_checkpoint,
                              load_checkpoint, prepare_run_dir, restore, save_final, truncate_metrics)
from qlora.config import Config, load_config
from qlora.data import inspect_rows, prepare_data
from qlora.errors import run_cli
from qlora.logs import MetricsLog
from qlora.loop import CheckpointPlan, FitResult, FitSettings, fit
from qlora.memory import estimate_for_config, format_estimate
from qlora.model import build_model, load_tokenizer, read_architecture, resolve_device, trainable_parameters
from qlora.optim import build_optimizer, build_scaler, build_scheduler


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of the output directory, or from CHECKPOINT")
    p.add_argument("--inspect-data", type=int, metavar="N",
                   help="show the first N encoded examples and exit (loads no model)")
    p.add_argument("--json", action="store_true", help="with --inspect-data: print a JSON list")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the predicted peak before loading the model, and the measured one at the end")
    p.add_argument("--memory-snapshot", type=int, default=0, metavar="N",
                   help="record allocations for the first N steps into <output_dir>/memory_snapshot.pickle")
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> None:
    # 1. config: every problem reported before anything heavy loads
    cfg = load_config(args.config, args.overrides)
    t = cfg.train

    # 2. data: tokenize, mask prompts, cut long contexts around the answer
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, t.seed)
    estimate = None
    if args.estimate_memory:  # from config.json and the longest row: nothing is loaded
        estimate = estimate_for_config(cfg, read_architecture(cfg.model),
                                       seq=max(len(r.input_ids) for r in data.rows))
        print(format_estimate(estimate))
    if args.inspect_data is not None:  # also the way to stop after the estimate: --inspect-data 0
        show_examples(inspect_rows(data, tokenizer, args.inspect_data), args.json)
        return
    print("\n".join(data.report.lines()))
    order = data_order(data.rows, cfg.data, t, tokenizer.pad_token_id)
    n_steps = total_steps(t, len(data.rows))
    fingerprint = data_fingerprint(data.rows)
    if args.resume is None:
        check_output_dir(cfg, args.overwrite)

    # 3. model: 4-bit base + fp32 LoRA adapters, in train mode
    device = resolve_device(t.device)
    ckpt = resume_point(args, cfg, fingerprint, device)
    model = build_model(cfg.model, cfg.lora, t.precision, device, t.seed)
    trainable, total = trainable_parameters(model)
    print(f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%) on {device}")

    # 4. optimizer, schedule, loss scaling
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, n_steps)
    scaler = build_scaler(t.precision, device)

    # 5. loop (from a checkpoint: restored last, so its RNG states are the loop's)
    run_dir = Path(t.output_dir) if ckpt else prepare_run_dir(cfg, args.overwrite)
    if ckpt:
        restore(ckpt, model, optimizer, scheduler, scaler)
        truncate_metrics(run_dir / "metrics.jsonl", ckpt.step)
    settings = FitSettings(precision=t.precision, max_grad_norm=t.max_grad_norm,
                           supervised_logits_only=t.supervised_logits_only,
                           progress=cfg.log.progress,
                           memory_snapshot_steps=args.memory_snapshot)
    plan = CheckpointPlan(run_dir=run_dir, every=t.save_every, keep_last=t.keep_last, config=cfg,
                          data_fingerprint=fingerprint)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    try:
        result = fit(model, order, optimizer, scheduler, scaler, settings, device, n_steps, metrics,
                     plan, start_step=ckpt.step if ckpt else 0,
                     progress=ckpt.state["progress"] if ckpt else None)
    finally:
        metrics.close()
    report_end(args, result, estimate)
    if result.interrupted:
        return

    # 6. save
    final = save_final(model, tokenizer, cfg, run_dir)
    print(f"saved adapter, tokenizer and config to {final}")


def report_end(args: argparse.Namespace, result: FitResult, estimate: dict[str, int] | None) -> None:
    """The measured peak beside the estimate; after a signal, the command that resumes."""
    if estimate and result.peak_gib is not None:
        measured, predicted = result.peak_gib, estimate["total"] / 2**30
        print(f"peak allocated: measured {measured:.2f} GiB, estimated {predicted:.2f} GiB "
              f"({100 * (predicted - measured) / measured:+.1f}%)")
    if result.interrupted:
        command = shlex.join(["python", "train.py", "--config", args.config, *args.overrides, "--resume"])
        print(f"{result.interrupted}: stopped after step {result.step}, saved {result.checkpoint}\n"
              f"resume with: {command}")


def resume_point(args: argparse.Namespace, cfg: Config, fingerprint: str,
                 device: torch.device) -> Checkpoint | None:
    """The checkpoint to continue from, checked against this config and data, or None."""
    if args.resume is None:
        return None
    path = find_checkpoint(Path(cfg.train.output_dir), None if args.resume == "latest" else args.resume)
    ckpt = load_checkpoint(path, device)
    for line in check_compatible(cfg, ckpt, fingerprint):
        print(f"resume: allowed change {line}")
    print(f"resume: from {path} (step {ckpt.step})")
    return ckpt


def show_examples(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps([{k: r[k] for k in ("prompt", "target", "n_tokens", "n_supervised", "truncated")}
                          for r in rows], ensure_ascii=False, indent=1))
        return
    for r in rows:
        print(f"=== {r['id']}: {r['n_tokens']} tokens, {r['n_supervised']} supervised"
              f"{', context truncated' if r['truncated'] else ''}")
        print(f"--- prompt (label -100)\n{r['prompt']}\n--- target (learned)\n{r['target']}\n")


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
