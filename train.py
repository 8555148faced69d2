"""QLoRA fine-tuning, phase by phase: config -> data -> model -> optimizer -> loop -> save.

    python train.py --config configs/tiny.yaml [section.key=value ...] [--overwrite]
    python train.py --config configs/tiny.yaml --inspect-data 3 [--json]

Each phase is one call into qlora/; set a breakpoint on any line below and step in.
"""

from __future__ import annotations

import argparse
import json
import sys

from qlora.batching import DataOrder, windows_per_epoch
from qlora.checkpoint import check_output_dir, prepare_run_dir, save_final
from qlora.config import load_config
from qlora.data import inspect_rows, prepare_data
from qlora.errors import UserError
from qlora.logs import MetricsLog
from qlora.loop import FitSettings, fit
from qlora.model import build_model, load_tokenizer, resolve_device, trainable_parameters
from qlora.optim import build_optimizer, build_scaler, build_scheduler


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--inspect-data", type=int, metavar="N",
                   help="show the first N encoded examples and exit (loads no model)")
    p.add_argument("--json", action="store_true", help="with --inspect-data: print a JSON list")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    # 1. config: every problem reported before anything heavy loads
    cfg = load_config(args.config, args.overrides)
    t = cfg.train

    # 2. data: tokenize, mask prompts, cut long contexts around the answer
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, t.seed)
    if args.inspect_data is not None:
        show_examples(inspect_rows(data, tokenizer, args.inspect_data), args.json)
        return
    print("\n".join(data.report.lines()))
    order = DataOrder(data.rows, t.batch_size, t.grad_accum, t.seed, cfg.data.group_by_length)
    total_steps = t.max_steps or t.epochs * windows_per_epoch(len(data.rows), t.batch_size, t.grad_accum)
    check_output_dir(cfg, args.overwrite)

    # 3. model: 4-bit base + fp32 LoRA adapters, in train mode
    device = resolve_device(t.device)
    model = build_model(cfg.model, cfg.lora, t.precision, device, t.seed)
    run_dir = prepare_run_dir(cfg, args.overwrite)  # only now: a failed load leaves nothing behind
    trainable, total = trainable_parameters(model)
    print(f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%) on {device}")

    # 4. optimizer, schedule, loss scaling
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = build_scaler(t.precision, device)

    # 5. loop
    settings = FitSettings(precision=t.precision, max_grad_norm=t.max_grad_norm,
                           supervised_logits_only=t.supervised_logits_only,
                           pad_id=tokenizer.pad_token_id, progress=cfg.log.progress)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    try:
        fit(model, order, optimizer, scheduler, scaler, settings, device, total_steps, metrics)
    finally:
        metrics.close()

    # 6. save
    final = save_final(model, tokenizer, cfg, run_dir)
    print(f"saved adapter, tokenizer and config to {final}")


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
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
