"""QLoRA fine-tuning, phase by phase: config -> data -> resume point -> model -> training state ->
loop -> save.

    python train.py --config configs/tiny.yaml [section.key=value ...] [--overwrite]
    python train.py --config configs/tiny.yaml --resume                 # the latest checkpoint
    python train.py --config configs/tiny.yaml --resume-from CHECKPOINT_DIR
    python train.py --config configs/tiny.yaml --dry-run [--estimate-memory]
    python train.py --config configs/tiny.yaml --inspect-data 3 [--json]
    python train.py --config configs/tiny.yaml --break-at 5:optimizer   # breakpoint() in step 5

Each phase is one call into qlora/; set a breakpoint on any line of `run` and step in.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora import quiet_other_ranks, use_expandable_segments
from qlora.config import Config, load_config
from qlora.debug import BREAK_PHASES, BreakAt, parse_break_at
from qlora.errors import UserError, run_cli
from qlora.hub import offline_unless_reachable

use_expandable_segments()  # before torch touches CUDA: 11.7 instead of 16.1 GiB reserved at 2048 (README)

if TYPE_CHECKING:  # names for the type hints only: the heavy modules load inside run()
    import torch

    from qlora.checkpoint import Start
    from qlora.data import TokenizedData
    from qlora.distributed import World
    from qlora.loop import FitResult
    from qlora.offload import ActivationOffload


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config file (python -m qlora.config lists every key)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--overwrite", action="store_true",
                       help="replace the run in the output directory (its other files are kept)")
    start.add_argument("--resume", action="store_true", help="continue from the output directory's latest checkpoint")
    start.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint directory")
    start.add_argument("--auto-resume", action="store_true",
                       help="continue from the latest checkpoint if there is one, else start: the command "
                            "torchrun --max-restarts repeats after a worker died")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, data and output directory (or checkpoint), print the plan, load no model")
    p.add_argument("--inspect-data", type=int, metavar="N",
                   help="print the data report and the first N encoded examples, then exit (loads no model)")
    p.add_argument("--json", action="store_true", help="with --inspect-data: print a JSON list")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print the predicted peak before loading the model, and the measured one (CUDA) at the end")
    p.add_argument("--memory-snapshot", type=int, default=0, metavar="N",
                   help="record CUDA allocations for the first N steps into <output_dir>/memory_snapshot.pickle")
    p.add_argument("--break-at", type=parse_break_at, metavar="STEP[:PHASE]",
                   help=f"call breakpoint() in optimizer step STEP at PHASE ({', '.join(BREAK_PHASES)}; default "
                        f"window); PYTHONBREAKPOINT picks the debugger")
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> None:
    quiet_other_ranks()  # under torchrun only rank 0 prints, from here on
    # 1. config: every problem reported before torch loads (a second, not ten)
    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    offline_unless_reachable(cfg)

    # torch, transformers, peft and bitsandbytes load only now
    from qlora import distributed
    from qlora.batching import data_order, pack_length, total_steps
    from qlora.checkpoint import (data_fingerprint, numbers_config, open_run_dir, peft_layout, save_final,
                                  trainable_weights)
    from qlora.data import prepare_data
    from qlora.logs import MetricsLog
    from qlora.loop import SavePlan, StepSettings, Watch, fit
    from qlora.memory import cap_memory
    from qlora.model import load_tokenizer
    from qlora.optim import build_training_state
    from qlora.prompts import build_prompter

    # 2. data: prompt format (plain or chat template), tokenize, mask prompts, cut long contexts
    #    around the answer
    tokenizer = load_tokenizer(cfg.model)
    prompter = build_prompter(tokenizer, cfg.data.format, cfg.data.chat_template_kwargs)
    data = prepare_data(cfg.data, prompter, t.seed)
    if args.inspect_data is None:  # a data-only command plans nothing
        cfg = plan_memory(args, cfg, data)  # with train.memory_budget_gib: the fastest recompute (and rows) that fits
    estimate = report_data(args, cfg, data, tokenizer)
    if args.inspect_data is not None:
        return
    order = data_order(data.rows, cfg.data, t, tokenizer.pad_token_id)
    n_steps = total_steps(t, len(data.rows))
    fingerprint = data_fingerprint(data.rows)

    # one process, or one of torchrun's: its rank and device (rank 0 alone prints and writes files)
    world, device = distributed.init(t.device)
    cap_memory(device, t.memory_cap_gib)  # before anything is allocated: a large GPU acting as a smaller one
    if args.break_at and world.size > 1:
        raise UserError("--break-at stops one process in the debugger: run train.py without torchrun")
    if cfg.model.shard and world.size == 1:
        raise UserError("model.shard=true splits the model over torchrun's processes: run it with "
                        "torchrun --nproc-per-node N (N >= 2), or set model.shard=false")
    hint = distributed.split_hint(cfg.data.packing, cfg.data.pack_rows_multiple, world)
    if hint:
        print(hint)

    # 3. resume point: a fresh start, or a checkpoint checked against this config and data; every
    #    rank must start from the same one
    start = resume_point(args, cfg, fingerprint, n_steps, device, world.size)
    distributed.check_same(world, "start (step, data fingerprint, config)",
                           (start.step, fingerprint, numbers_config(cfg)))
    # each rank plans for its own GPU's free memory: shorter rows on one rank would split other rows
    distributed.check_same(world, "packed row length", pack_length(cfg.data, t),
                           hint="each rank's memory plan fits its own GPU's free memory: set data.pack_length")
    check_break_at(args.break_at, start.step, n_steps)
    if args.dry_run:
        print(f"dry run: steps {start.step + 1}-{n_steps} of {t.batch_size} x {t.grad_accum} examples on "
              f"{world.size} x {device.type}, into {t.output_dir}; no model loaded, nothing written")
        return

    # 4. model: 4-bit base + fp32 LoRA adapters, in train mode; on several ranks DDP over the
    #    adapters, or (model.shard) FSDP over the 4-bit base
    model = load_model(cfg, device, world)
    start.restore_adapter(model)
    trained = distributed.wrap(model, world, device, sharded=cfg.model.shard)

    # 5. training state: optimizer, schedule, loss scaling (from a checkpoint: restored last, so
    #    its RNG states are the loop's)
    state = build_training_state(trained, t, n_steps, device, flat=not cfg.model.shard)  # not tried under FSDP
    run_dir = open_run_dir(cfg, start) if world.is_main else Path(t.output_dir)
    distributed.barrier(world)
    start.restore(trained, state)
    start = start.released()  # memory: the checkpoint's copies of the adapter and optimizer states

    # 6. loop
    if args.memory_snapshot and device.type != "cuda":
        print("memory: --memory-snapshot records CUDA allocations; on the CPU nothing is recorded")
    settings = StepSettings.of(t, args.break_at, world, sharded=cfg.model.shard)
    saving = SavePlan(run_dir=run_dir, every=t.save_every, keep_last=t.keep_last, config=cfg,
                      data_fingerprint=fingerprint, writes=world.is_main)
    metrics = MetricsLog(run_dir / "metrics.jsonl" if world.is_main else None)
    try:
        result = fit(trained, order, state, settings, device, n_steps, metrics, saving, start,
                     Watch(progress_bar=t.progress_bar and world.is_main, memory_snapshot_steps=args.memory_snapshot))
    finally:
        metrics.close()

    # 7. save
    adapter = peft_layout(trainable_weights(trained))
    final = None if result.interrupted or not world.is_main else save_final(model, adapter, tokenizer, cfg, run_dir)
    print(summary(args, result, estimate, run_dir, final, world.size, model.activation_offload))


def load_model(cfg: Config, device: torch.device, world: World) -> torch.nn.Module:
    """build_model, after the weights of ours it reads (random, or a sharded run's pre-quantized
    copy) are written once per machine."""
    from qlora import distributed
    from qlora.model import base_weights, build_model, trainable_parameters

    if world.local_rank == 0:  # on its GPU; the machine's other ranks read them
        base_weights(cfg.model, cfg.train.precision, cfg.train.seed, device)
    distributed.barrier(world)
    model = build_model(cfg.model, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    trainable, total = trainable_parameters(model)
    print(f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.4f}%) on {device}")
    return model


def plan_memory(args: argparse.Namespace, cfg: Config, data: TokenizedData) -> Config:
    """The config with the memory plan applied (qlora/plan.py), printed; the config as it is without
    a budget (null, or auto on a CPU), or, said, when it sets the planned keys itself, or (auto)
    with eager attention or nothing fitting."""
    from qlora.config import given_keys
    from qlora.distributed import launched_ranks, local_device
    from qlora.estimate import estimate_for_config
    from qlora.memory import GIB, size
    from qlora.model import read_architecture
    from qlora.plan import EAGER, choose, format_plans, resolve_budget

    budget = resolve_budget(cfg)  # with `auto`: this rank's GPU's free memory (none on a CPU)
    if budget is None:
        return cfg
    architecture, seq, ranks = read_architecture(cfg.model), data.longest, launched_ranks()
    choice = choose(cfg, architecture, seq, given_keys(args.config, args.overrides), budget, ranks,
                    gpu=local_device(cfg.train.device).type == "cuda")
    if choice.chosen is not None:
        print(f"memory plan: {choice.chosen.describe()}, estimated peak {size(choice.chosen.peak_bytes).strip()} "
              f"of a {budget.describe()}, {choice.chosen.speed:.2f}x the speed of recomputing every layer")
        if args.estimate_memory:
            print(format_plans(choice.plans, choice.chosen, budget))
    elif choice.reason == EAGER:  # an estimate that does not apply says nothing
        print(f"memory plan: none, {choice.reason}")
    else:
        peak = estimate_for_config(choice.config, architecture, seq, ranks)["total"]
        print(f"memory plan: none, {choice.reason}; estimated peak {size(peak).strip()}, "
              f"{'within' if peak <= budget.gib * GIB else 'OVER'} the {budget.describe()}")
    return choice.config


def report_data(args: argparse.Namespace, cfg: Config, data: TokenizedData, tokenizer: Any) -> dict[str, int] | None:
    """The data report; with --estimate-memory the predicted peak (from config.json and the
    longest row: nothing is loaded), which it returns; with --inspect-data the examples."""
    from qlora.distributed import launched_ranks
    from qlora.estimate import estimate_for_config, format_estimate
    from qlora.model import read_architecture

    print("\n".join(data.report.lines()), file=sys.stderr if args.json else sys.stdout)  # --json: stdout is JSON
    estimate = None
    if args.estimate_memory:
        estimate = estimate_for_config(cfg, read_architecture(cfg.model), seq=data.longest,
                                       ranks=launched_ranks())
        print(format_estimate(estimate))
    if args.inspect_data is not None:
        show_examples(data, tokenizer, args.inspect_data, args.json)
    return estimate


def resume_point(args: argparse.Namespace, cfg: Config, fingerprint: str, n_steps: int,
                 device: torch.device, world_size: int) -> Start:
    """Start() for a fresh run (whose output directory must not hold a run, unless --overwrite), or
    the checkpoint's Start, checked against this config and data."""
    from qlora.checkpoint import (Start, check_compatible, check_output_dir, find_checkpoint, holds_run_of,
                                  list_checkpoints, load_checkpoint)

    run_dir = Path(cfg.train.output_dir)
    if args.auto_resume and not list_checkpoints(run_dir):
        # the first launch, or a restart before the first checkpoint: that run's own files may go
        replace = holds_run_of(cfg, run_dir)
        check_output_dir(cfg, replace)
        return Start(replace_run=replace)
    if not (args.resume or args.resume_from or args.auto_resume):
        check_output_dir(cfg, args.overwrite)
        return Start(replace_run=args.overwrite)
    path = find_checkpoint(run_dir, args.resume_from)
    ckpt = load_checkpoint(path, device)
    if run_dir.resolve() != path.resolve().parent.parent:
        check_output_dir(cfg, overwrite=False)  # resumed into another folder: never over another run
    for line in check_compatible(cfg, ckpt, fingerprint):
        print(f"resume: allowed change {line}")
    if ckpt.world_size != world_size:  # the same examples per step and gradient on any number of ranks
        print(f"resume: allowed change world size: {ckpt.world_size} -> {world_size}")
    if ckpt.step >= n_steps:
        raise UserError(f"nothing to resume: checkpoint {path} is at step {ckpt.step}, the run's last step "
                        f"is {n_steps} (its adapter is in {run_dir / 'final'})")
    print(f"resume: from {path} (step {ckpt.step} of {n_steps})")
    return Start.from_checkpoint(ckpt)


def check_break_at(break_at: BreakAt | None, done: int, n_steps: int) -> None:
    if break_at and not done < break_at.step <= n_steps:
        raise UserError(f"--break-at step {break_at.step} is not among the steps this run will take "
                        f"({done + 1}-{n_steps})")


def summary(args: argparse.Namespace, result: FitResult, estimate: dict[str, int] | None, run_dir: Path,
            final: Path | None, world_size: int, offload: ActivationOffload | None) -> str:
    """What a run leaves behind, in a few lines: also printed without the progress bar."""
    lines = [f"done: step {result.step}; {result.steps_run} steps in {result.seconds:.1f} s, median "
             f"{result.median_tokens_per_s:,.0f} tokens/s"]
    if result.peak_gib is not None:
        lines.append(f"memory: peak allocated {result.peak_gib:.2f} GiB, peak reserved "
                     f"{result.peak_reserved_gib:.2f} GiB")
    else:
        lines.append(f"memory: peak RSS {result.peak_rss_gib:.2f} GiB (allocated and reserved are CUDA's)")
    if estimate:
        predicted = estimate["total"] / 2**30
        lines.append(f"memory: estimated peak allocated {predicted:.2f} GiB" + (
            f", measured {result.peak_gib:.2f} GiB ({100 * (predicted - result.peak_gib) / result.peak_gib:+.1f}%)"
            if result.peak_gib is not None else " (measured only on CUDA)"))
    if offload is not None:  # late copies back: a prefetch missed, the backward waited for the copy
        what = [*([f"layers {', '.join(map(str, offload.offloaded))}"] if offload.offloaded else []),
                *([f"the inputs of {len(offload.inputs)} recomputing layer{'s' * (len(offload.inputs) > 1)}"]
                  if offload.inputs else [])]
        lines.append(f"memory: {' and '.join(what)} offloaded {offload.copied_bytes / 2**30:.2f} GiB to host "
                     f"memory in the last micro-batch; {offload.late_copies} copies back began late")
    lines.append(f"metrics: {run_dir / 'metrics.jsonl'}; checkpoint: {result.checkpoint}")
    if final is not None:
        lines.append(f"adapter, tokenizer and config: {final}")
    else:
        machines = int(os.environ.get("GROUP_WORLD_SIZE", 1))  # torchrun's count of machines
        launcher = (["python"] if world_size == 1 else
                    ["torchrun", *([f"--nnodes={machines}"] if machines > 1 else []),
                     f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', world_size)}"])
        command = shlex.join([*launcher, "train.py", "--config", args.config, *args.overrides, "--resume"])
        lines.append(f"{result.interrupted}: stopped after step {result.step}\nresume with: {command}")
    return "\n".join(lines)


def show_examples(data: TokenizedData, tokenizer: Any, n: int, as_json: bool) -> None:
    from qlora.data import inspect_rows

    rows = inspect_rows(data, tokenizer, n)
    if as_json:
        print(json.dumps([{k: r[k] for k in ("id", "prompt", "target", "n_tokens", "n_supervised", "truncated")}
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
