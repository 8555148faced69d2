"""The same QLoRA job through this project's loop and through TRL's SFTTrainer, on the GPU.

Both sides: the --config's architecture (default Llama-2-7B; configs/*-korquad.yaml for the other
families) with random weights, NF4 + double quantization, LoRA r=16 /
alpha 32 / dropout 0.05 on q,k,v,o, gradient checkpointing, paged 8-bit AdamW, batch 4 x
accumulation 4, lr 2e-4, bf16, the KorQuAD dev file, the same tokenizer and the same tokenized
rows (prompt masked, answer + EOS learned). TRL is an optional extra (`pip install -e '.[bench]'`)
and is imported only here.

    python bench/compare_trl.py ours  --shape extractive_2048 --steps 6 --out bench/results/ours_2048.json
    python bench/compare_trl.py trl   --shape extractive_2048 --steps 6 --out bench/results/trl_2048.json
    python bench/compare_trl.py parity --shape extractive_1024 --steps 20 --out bench/results/parity.json
    python bench/compare_trl.py table bench/results/*.json           # the README table

`ours` runs the levers one after another on one loaded model, each a set of config overrides
added to the last (LEVERS): plain -> +length grouping -> +logits at supervised positions ->
+compute-dtype norms -> no cuDNN attention -> +varlen attention -> +packing -> +compiled decoder
layers (-> +fewer recomputed layers, with model.recompute_layers=N) (-> with --budget GiB, the memory
plan train.memory_budget_gib would make for the last variant: recompute, lean layers, offloaded
layers and inputs, dequantized layers; as a GPU run in one process plans them).
The job both sides run is JOB (config overrides, printed in the result file) on top of --config;
further overrides (tokenizer, data file) come after the options. Runs on a CPU too, slowly, with
configs/tiny.yaml: a check that the script works, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qlora import use_expandable_segments

use_expandable_segments()  # before torch touches CUDA

import torch  # noqa: E402

from qlora.attention import BOUNDED  # noqa: E402
from qlora.batching import DataOrder, data_order  # noqa: E402
from qlora.config import Config, checked, load_config  # noqa: E402
from qlora.data import IGNORE, prepare_data  # noqa: E402
from qlora.loop import StepSettings, micro_batch_loss, train_step  # noqa: E402
from qlora.memory import GIB, MemoryMeter, step_peak_gib  # noqa: E402
from qlora.families import LEVER_LIMITS, nearest_allowed  # noqa: E402
from qlora.model import (apply_levers, build_model, for_inference, load_base_model, load_tokenizer,  # noqa: E402
                         read_architecture, resolve_device)
from qlora.optim import build_training_state  # noqa: E402
from qlora.plan import Budget, choose  # noqa: E402
from qlora.prompts import build_prompter  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM; the H200 has the same tensor cores
SHAPES = {"closed_book": ["data.format=closed_book", "data.max_length=512"],
          "extractive_1024": ["data.format=extractive", "data.max_length=1024"],
          "extractive_2048": ["data.format=extractive", "data.max_length=2048"]}
# The tutorial's job, the same on both sides.
JOB = ["model.random_init=true", "model.cudnn_attention=true", "model.upcast_non_quantized=true",
       "train.precision=bf16", "train.batch_size=4", "train.grad_accum=4", "train.lr=2e-4",
       "train.optimizer=paged_adamw_8bit", "model.recompute_activations=true"]
LEVERS = [  # (name, config overrides added to the previous variant's)
    ("plain", ["data.group_by_length=false", "train.supervised_logits_only=false",
               "model.upcast_non_quantized=true", "model.cudnn_attention=true", "model.attn_implementation=sdpa",
               "data.packing=false", "model.compile_layers=false", "model.recompute_layers=null"]),
    ("+length grouping", ["data.group_by_length=true"]),
    ("+logits at supervised positions", ["train.supervised_logits_only=true"]),
    ("+compute-dtype norms/head", ["model.upcast_non_quantized=false"]),
    ("+no cuDNN attention", ["model.cudnn_attention=false"]),
    ("+varlen attention", ["model.attn_implementation=varlen"]),
    ("+packing, one row per micro-batch", ["data.packing=true"]),
    ("+compiled decoder layers", ["model.compile_layers=true"]),
]
PLAIN = LEVERS[0][1]  # TRL's side: padded rows, SDPA, uncompiled, every layer recomputed


def job_config(config: str, shape: str, overrides: list[str], added: list[str] = ()) -> Config:
    """config file + JOB + shape + overrides + `added` (a lever's or TRL's side). A value the model's
    architecture rules out (qlora/families.py) becomes the nearest one it allows: for Gemma-2, TRL's
    side and our plain variant run eager attention (as TRL's docs advise for it), the varlen lever flex."""
    cfg = load_config(config, [*JOB, *SHAPES[shape], *overrides, *added])
    return checked(dataclasses.replace(cfg, model=nearest_allowed(cfg.model, read_architecture(cfg.model))))


def setup(config: str, shape: str, overrides: list[str], added: list[str] = ()) -> tuple[Config, Any, Any, torch.device]:
    """The job's config (job_config), tokenizer, tokenized data, device."""
    cfg = job_config(config, shape, overrides, added)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, build_prompter(tokenizer, cfg.data.format, cfg.data.chat_template_kwargs),
                        cfg.train.seed)
    return cfg, tokenizer, data, resolve_device(cfg.train.device)


def n_params(cfg: Config) -> int:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_architecture(cfg.model))
    return sum(p.numel() for p in model.parameters())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(tokens: int, seconds: float, steps: int, params: int, peak_allocated_gib: float | None,
            peak_reserved_gib: float | None) -> dict[str, float | None]:
    """MFU both ways: 6N per token (the hardware's work with full recompute counted as a forward)
    and 4N (the model's work for a frozen base: forward + input gradients, no weight gradients)."""
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / steps,
            "mfu": 6 * params * tokens / seconds / H100_BF16_DENSE,
            "mfu_4n": 4 * params * tokens / seconds / H100_BF16_DENSE,
            "peak_allocated_gib": peak_allocated_gib, "peak_reserved_gib": peak_reserved_gib}


def run_steps(model: Any, cfg: Config, order: DataOrder, device: torch.device, steps: int) -> list[dict[str, float]]:
    """Optimizer steps 1..steps of train.py's train_step: the loss, real tokens, wall time and memory
    record of each."""
    state = build_training_state(model, cfg.train, steps, device)
    settings = StepSettings.of(cfg.train)
    meter, out = MemoryMeter(device), []
    for step in range(1, steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        _, batches = order.batches(step - 1)
        result = train_step(model, batches, state, settings, device, meter, step)  # reads the loss: a sync point
        out.append({"loss": result.loss, "tokens": sum(b["n_tokens"] for b in batches),
                    "seconds": time.perf_counter() - t0, "mem": meter.step_record()})
    return out


# ---------------------------------------------------------------- our loop

def levers_for(cfg: Config) -> list[tuple[str, list[str]]]:
    """LEVERS, then the config's own recompute count where it sets one (the plain variant recomputes
    every layer)."""
    return LEVERS + ([(f"+recompute {cfg.model.recompute_layers} of "
                       f"{read_architecture(cfg.model).num_hidden_layers} layers",
                       [f"model.recompute_layers={cfg.model.recompute_layers}"])]
                     if cfg.model.recompute_layers is not None else [])


def ran_instead(change: list[str], variant: Config) -> str:
    """A lever's note where the model ruled its value out and job_config ran the nearest allowed."""
    limited = {limit.key for limit in LEVER_LIMITS}
    swapped = [f"model.{key}={getattr(variant.model, key)}" for key, value in
               (c.removeprefix("model.").split("=", 1) for c in change if c.startswith("model."))
               if key in limited and str(getattr(variant.model, key)) != value]
    return f" (ran {', '.join(swapped)}: the nearest this model allows)" if swapped else ""


def with_every_lever(config: str, shape: str, overrides: list[str]) -> Config:
    """The config of `ours --only-last` (without --budget): every lever on."""
    cfg = job_config(config, shape, overrides)
    return job_config(config, shape, overrides, [c for _, change in levers_for(cfg) for c in change])


def run_ours(config: str, shape: str, overrides: list[str], steps: int, only_last: bool = False,
             skip: tuple[str, ...] = (), budget: float | None = None) -> list[dict]:
    cfg, tokenizer, data, device = setup(config, shape, overrides)
    levers = [(name, change) for name, change in levers_for(cfg) if name not in skip]
    variants, added = [], []
    for name, change in levers:
        added += change
        variant = job_config(config, shape, overrides, added)
        variants.append((name + ran_instead(change, variant) + (f" (without {', '.join(skip)})" if skip else ""),
                         variant))
    if budget is not None:  # train.memory_budget_gib's plan for the last variant, every planned key left to it
        last = variants[-1][1]
        choice = choose(last, read_architecture(last.model), data.longest, set(), Budget(budget, False),
                        gpu=device.type == "cuda")
        variants.append((f"+memory plan for {budget:g} GiB: {choice.chosen.describe()}", choice.config))
    model = build_model(variants[0][1].model, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    params, results, previous = n_params(cfg), [], variants[0][1]
    for index, (name, variant) in enumerate(variants):
        apply_levers(model, variant.model, variant.train.precision)
        if only_last and index < len(variants) - 1:
            previous = variant
            continue
        order = data_order(data.rows, variant.data, variant.train, tokenizer.pad_token_id)
        attn, dense = variant.model.attn_implementation, for_inference(variant.model).attn_implementation
        check = (loss_against_dense(model, order, variant, device, dense)
                 if attn in BOUNDED and
                 (only_last or previous.model.attn_implementation != attn or previous.data.packing != variant.data.packing)
                 else None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        timed = run_steps(model, variant, order, device, steps + 1)[1:]  # step 1 warms up (and compiles)
        peaks = [s["mem"] for s in timed]  # the meter's, per phase: the allocator's own peak is reset by it
        row = {"side": "ours", "variant": name, **summary(
            sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed), steps, params,
            max(filter(None, (step_peak_gib(m) for m in peaks)), default=None),
            max(filter(None, (m["peak_reserved_gib"] for m in peaks)), default=None))}
        if check is not None:
            row[f"step0_loss_relative_to_{dense}"] = check
        offload = model.activation_offload  # model.offload_layers and offload_inputs (qlora/offload.py)
        if offload is not None:
            row["offload"] = {"layers": offload.offloaded, "inputs": offload.inputs,
                              "gib_last_micro_batch": offload.copied_bytes / GIB, "late_copies": offload.late_copies}
        if variant.model.compile_layers:
            from torch._dynamo.utils import counters
            row["compile"] = {"graph_breaks": sum(counters["graph_break"].values()),
                              "unique_graphs": counters["stats"]["unique_graphs"]}
        print(json.dumps(row), flush=True)
        results.append(row)
        previous = variant
    return results


def loss_against_dense(model: Any, order: DataOrder, cfg: Config, device: torch.device, dense: str) -> float:
    """|bounded - dense| / dense for the loss of step 0's window, same weights, same batches: varlen
    or flex against `dense`, what generation runs (SDPA; eager for Gemma-2). The GPU side of the CPU
    tests that these kernels keep the loss."""
    losses, attn = [], cfg.model.attn_implementation
    model.eval()  # LoRA dropout off: the two passes must see the same function
    with torch.no_grad():
        for implementation in (attn, dense):
            model.get_base_model().set_attn_implementation(implementation)
            losses.append(sum(float(micro_batch_loss(model, b, cfg.train.precision, device,
                                                     cfg.train.supervised_logits_only))
                              for b in order.batches(0)[1]))
    model.get_base_model().set_attn_implementation(attn)
    model.train()
    return abs(losses[0] - losses[1]) / losses[1]


# ---------------------------------------------------------------- TRL

def trl_dataset(rows: list[Any], tmp: Path) -> Any:
    """Pre-tokenized rows with TRL's completion_mask, through a JSON file (Dataset.from_list fails
    on the GPU machine's Python 3.12)."""
    import datasets

    path = tmp / "rows.jsonl"
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r.input_ids,
                                "completion_mask": [int(label != IGNORE) for label in r.labels]}) + "\n")
    return datasets.load_dataset("json", data_files=str(path), split="train")


def trl_trainer(cfg: Config, model: Any, tokenizer: Any, rows: list[Any], steps: int, tmp: Path,
                sequential: bool, peft: bool) -> Any:
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """Counts the real tokens of every micro-batch it trains on."""
        token_counts: list[int] = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            self.token_counts.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *args, **kwargs)

    t = cfg.train
    args = SFTConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=t.batch_size,
                     gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type="cosine",
                     warmup_steps=t.warmup_ratio, max_steps=steps, bf16=True, optim="paged_adamw_8bit",
                     gradient_checkpointing=True, logging_steps=1, report_to=[], save_strategy="no",
                     max_length=cfg.data.max_length, completion_only_loss=True, seed=t.seed,
                     dataloader_num_workers=0, max_grad_norm=t.max_grad_norm, weight_decay=t.weight_decay,
                     train_sampling_strategy="sequential" if sequential else "random",
                     use_cpu=not torch.cuda.is_available())
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM") if peft else None
    return CountingSFTTrainer(model=model, args=args, train_dataset=trl_dataset(rows, tmp),
                              processing_class=tokenizer, peft_config=lora)


def run_trl(config: str, shape: str, overrides: list[str], steps: int) -> list[dict]:
    from transformers import TrainerCallback

    cfg, tokenizer, data, device = setup(config, shape, overrides, PLAIN)

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, synchronized with the GPU."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.times.append(time.perf_counter() - self.start)

    model = load_base_model(cfg.model, cfg.train.precision, device, cfg.train.seed)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(cfg, model, tokenizer, data.rows, steps + 1, Path(tmp), sequential=False, peft=True)
        trainer.add_callback(clock)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    per_step = cfg.train.grad_accum
    tokens = sum(trainer.token_counts[per_step:per_step * (steps + 1)])  # step 0 warms up
    cuda = device.type == "cuda"
    row = {"side": "trl", "variant": "SFTTrainer", **summary(
        tokens, sum(clock.times[1:]), steps, n_params(cfg),
        torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        torch.cuda.max_memory_reserved(device) / GIB if cuda else None)}
    print(json.dumps(row), flush=True)
    return [row]


# ---------------------------------------------------------------- parity

PARITY = ["lora.dropout=0", "data.group_by_length=false"]  # the same function, the same rows in order


def run_parity(config: str, shape: str, overrides: list[str], steps: int) -> list[dict]:
    """Same initial adapter, same examples per step in the same order, dropout 0: per-step losses.
    Our side runs the levers the overrides turn on (e.g. model.attn_implementation=varlen
    data.packing=true model.compile_layers=true): packing regroups a step's examples into rows but
    keeps the step's examples, so the step's loss must still match. TRL's side: PLAIN."""
    cfg, tokenizer, data, device = setup(config, shape, [*overrides, *PARITY])
    order = data_order(data.rows, cfg.data, cfg.train, tokenizer.pad_token_id)
    ours_model = build_model(cfg.model, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    ours = [s["loss"] for s in run_steps(ours_model, cfg, order, device, steps)]
    del ours_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = [r for step in range(steps) for batch in order.window(step)[1] for r in batch]
    trl_cfg = job_config(config, shape, [*overrides, *PARITY], PLAIN)
    trl_model = build_model(trl_cfg.model, cfg.lora, cfg.train.precision, device, cfg.train.seed)  # same adapter
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(trl_cfg, trl_model, tokenizer, rows, steps, Path(tmp), sequential=True, peft=False)
        trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    deviation = [abs(a - b) / b for a, b in zip(ours, theirs)]
    row = {"side": "parity", "ours": ours, "trl": theirs, "max_relative_deviation": max(deviation),
           "step_of_max": 1 + deviation.index(max(deviation))}
    print(json.dumps(row), flush=True)
    return [row]


# ---------------------------------------------------------------- table

def table(paths: list[Path]) -> None:
    runs = [json.loads(p.read_text()) for p in paths]
    trl = {r["shape"]: r["results"][0] for r in runs if r["mode"] == "trl"}
    print("| shape | side / lever | tokens/s | s/step | peak alloc GiB | peak reserved GiB | MFU 6N | MFU 4N | vs TRL tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in sorted((r for r in runs if r["mode"] in ("ours", "trl")), key=lambda r: (r["shape"], r["mode"] == "ours")):
        for row in run["results"]:
            ref = trl.get(run["shape"])
            ratio = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            gib = lambda key: "-" if row[key] is None else f"{row[key]:.2f}"  # noqa: E731 (None on a CPU)
            print(f"| {run['shape']} | {row['side']}: {row['variant']} | {row['tokens_per_s']:,.0f} | "
                  f"{row['s_per_step']:.2f} | {gib('peak_allocated_gib')} | {gib('peak_reserved_gib')} | "
                  f"{100 * row['mfu']:.1f}% | {100 * 4 / 6 * row['mfu']:.1f}% | {ratio} |")  # files before mfu_4n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ours", "trl", "parity", "table"])
    p.add_argument("--config", default="configs/llama2-7b-korquad.yaml", help="the config JOB starts from")
    p.add_argument("rest", nargs="*", help="config overrides; for table, result files")
    p.add_argument("--shape", choices=list(SHAPES), default="extractive_2048")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path)
    p.add_argument("--only-last", action="store_true", help="ours: time only the variant with every lever")
    p.add_argument("--skip", action="append", default=[], choices=[name for name, _ in LEVERS[1:]],
                   help="ours: a lever to leave out, by name (repeat for more)")
    p.add_argument("--budget", type=float, help="ours: then the memory plan for this many GiB (train.memory_budget_gib), "
                   "which sets every key it plans (recompute, lean layers, offloaded layers and inputs, "
                   "dequantized layers)")
    args = p.parse_intermixed_args()
    if args.mode == "table":
        table([Path(x) for x in args.rest])
        return
    if args.mode == "ours":
        results = run_ours(args.config, args.shape, args.rest, args.steps, args.only_last, tuple(args.skip),
                           args.budget)
    else:
        results = {"trl": run_trl, "parity": run_parity}[args.mode](args.config, args.shape, args.rest, args.steps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "mode": args.mode, "shape": args.shape, "steps": args.steps, "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "versions": versions(),
            "command": " ".join(sys.argv), "job": JOB, "results": results}, indent=1))


def versions() -> dict[str, str]:
    import importlib.metadata as md
    found = {}
    for name in ("torch", "transformers", "bitsandbytes", "peft", "trl"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
