"""The same QLoRA job through this project's loop and through TRL's SFTTrainer, on the GPU.

Both sides: Llama-2-7B architecture with random weights, NF4 + double quantization, LoRA r=16 /
alpha 32 / dropout 0.05 on q,k,v,o, gradient checkpointing, paged 8-bit AdamW, batch 4 x
accumulation 4, lr 2e-4, bf16, the KorQuAD dev file, the same tokenizer and the same tokenized
rows (prompt masked, answer + EOS learned). TRL is an optional extra (`pip install -e '.[bench]'`)
and is imported only here.

    python bench/compare_trl.py ours  --shape extractive_2048 --steps 6 --out bench/results/ours_2048.json
    python bench/compare_trl.py trl   --shape extractive_2048 --steps 6 --out bench/results/trl_2048.json
    python bench/compare_trl.py parity --shape extractive_1024 --steps 20 --out bench/results/parity.json
    python bench/compare_trl.py table bench/results/*.json           # the README table

`ours` runs the levers one after another on one loaded model, each adding to the last:
plain -> +length grouping -> +logits at supervised positions -> +compute-dtype norms -> no cuDNN
attention -> +varlen attention -> +packing -> +compiled decoder layers (-> +fewer checkpointed
layers, with model.checkpoint_layers=N).
Common settings (tokenizer, data file) come as config overrides after the options.
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

from qlora.attention import VARLEN  # noqa: E402
from qlora.attention import register as register_varlen  # noqa: E402
from qlora.batching import DataOrder, data_order  # noqa: E402
from qlora.config import Config, ModelConfig, load_config  # noqa: E402
from qlora.data import IGNORE, prepare_data  # noqa: E402
from qlora.loop import micro_batch_loss, optimizer_step, train_step  # noqa: E402
from qlora.memory import GIB, MemoryMeter  # noqa: E402
from qlora.model import (DTYPES, build_model, cast_frozen_fp32, checkpoint_first_layers,  # noqa: E402
                         compile_decoder_layers, load_base_model, load_tokenizer, read_architecture,
                         resolve_device)
from qlora.optim import build_optimizer, build_scaler, build_scheduler  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM; the H200 has the same tensor cores
SHAPES = {"closed_book": ("closed_book", 512), "extractive_1024": ("extractive", 1024),
          "extractive_2048": ("extractive", 2048)}
LEVERS = [  # (name, changes to the previous variant)
    ("plain", {"group_by_length": False, "supervised_logits_only": False, "packing": False}),
    ("+length grouping", {"group_by_length": True}),
    ("+logits at supervised positions", {"supervised_logits_only": True}),
    ("+compute-dtype norms/head", {"upcast": False}),
    ("+no cuDNN attention", {"cudnn": False}),
    ("+varlen attention", {"attn": VARLEN}),
    ("+packing, one row per micro-batch", {"packing": True}),
    ("+compiled decoder layers", {"compile": True}),
    ("+fewer checkpointed layers", {"checkpoint_layers": True}),  # only with model.checkpoint_layers=N
]
BASE = ["model.random_init=true", "model.cudnn_attention=true", "model.upcast_non_quantized=true", "train.precision=bf16", "train.batch_size=4", "train.grad_accum=4",
        "train.lr=2e-4", "train.optimizer=paged_adamw_8bit", "model.gradient_checkpointing=true"]


def setup(shape: str, overrides: list[str]) -> tuple[Config, Any, Any, torch.device]:
    fmt, length = SHAPES[shape]
    cfg = load_config("configs/llama2-7b-korquad.yaml",
                      [*BASE, f"data.format={fmt}", f"data.max_length={length}", *overrides])
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    return cfg, tokenizer, data, resolve_device(cfg.train.device)


def n_params(cfg: Config) -> int:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(read_architecture(cfg.model))
    return sum(p.numel() for p in model.parameters())


def summary(tokens: int, seconds: float, steps: int, params: int, device: torch.device) -> dict[str, float]:
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / steps,
            "mfu": 6 * params * tokens / seconds / H100_BF16_DENSE,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


# ---------------------------------------------------------------- our loop

def run_ours(cfg: Config, tokenizer: Any, data: Any, device: torch.device, steps: int,
             only_last: bool = False, skip: tuple[str, ...] = ()) -> list[dict]:
    n_checkpointed = cfg.model.checkpoint_layers
    model_cfg = dataclasses.replace(cfg.model, checkpoint_layers=None, attn_implementation="sdpa", compile_layers=False)
    model = build_model(model_cfg, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    params, results, lever = n_params(cfg), [], {}
    for index, (name, change) in enumerate(LEVERS):
        if name in skip or ("checkpoint_layers" in change and n_checkpointed is None):
            continue
        lever.update(change)
        torch.backends.cuda.enable_cudnn_sdp(lever.get("cudnn", True))
        if lever.get("upcast") is False:  # in place and one way, so this lever comes late
            cast_frozen_fp32(model, DTYPES[cfg.train.precision])
        if lever.get("attn") == VARLEN:
            register_varlen()
            model.get_base_model().set_attn_implementation(VARLEN)
        if "compile" in change:
            compile_decoder_layers(model)
        if lever.get("checkpoint_layers"):
            checkpoint_first_layers(model, n_checkpointed)
            name = f"+checkpoint {n_checkpointed} of {read_architecture(cfg.model).num_hidden_layers} layers"
        if only_last and index < len(LEVERS) - 1 - (n_checkpointed is None):
            continue
        name = name if not skip else f"{name} (without {', '.join(skip)})"
        order = data_order(data.rows, dataclasses.replace(cfg.data, group_by_length=lever["group_by_length"],
                                                          packing=lever["packing"]),
                           cfg.train, tokenizer.pad_token_id)
        check = (loss_against_sdpa(model, order, cfg, device, lever)
                 if lever.get("attn") == VARLEN and ("attn" in change or "packing" in change) else None)
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, steps + 1)
        scaler = build_scaler(cfg.train.precision, device)
        meter = MemoryMeter(device)
        tokens, seconds = 0, 0.0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        for step in range(steps + 1):  # step 0 warms up and is not timed
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _, batches = order.batches(step)
            loss = train_step(model, batches, scaler, cfg.train.precision, device,
                              lever["supervised_logits_only"], meter)
            optimizer_step(model, optimizer, scheduler, scaler, cfg.train.max_grad_norm)
            float(loss)  # sync point
            if step:
                seconds += time.perf_counter() - t0
                tokens += sum(b["n_tokens"] for b in batches)
        row = {"side": "ours", "variant": name, **summary(tokens, seconds, steps, params, device)}
        if check is not None:
            row["step0_loss_relative_to_sdpa"] = check
        if lever.get("compile"):
            from torch._dynamo.utils import counters
            row["compile"] = {"graph_breaks": sum(counters["graph_break"].values()),
                              "unique_graphs": counters["stats"]["unique_graphs"]}
        print(json.dumps(row), flush=True)
        results.append(row)
        del optimizer
    return results


def loss_against_sdpa(model: Any, order: DataOrder, cfg: Config, device: torch.device,
                      lever: dict[str, Any]) -> float:
    """|varlen - SDPA| / SDPA for the loss of step 0's window, same weights, same batches: the
    GPU side of the CPU test that varlen attention keeps the loss."""
    losses = []
    model.eval()  # LoRA dropout off: the two passes must see the same function
    with torch.no_grad():
        for attn in (VARLEN, "sdpa"):
            model.get_base_model().set_attn_implementation(attn)
            losses.append(sum(float(micro_batch_loss(model, b, cfg.train.precision, device,
                                                     lever["supervised_logits_only"]))
                              for b in order.batches(0)[1]))
    model.get_base_model().set_attn_implementation(VARLEN)
    model.train()
    return abs(losses[0] - losses[1]) / losses[1]


# ---------------------------------------------------------------- TRL

def trl_model_config(model: ModelConfig) -> ModelConfig:
    """TRL's side runs padded rows through SDPA, uncompiled, whatever levers the config turns on
    for ours (varlen attention needs sequence bounds that only our loop passes)."""
    return dataclasses.replace(model, attn_implementation="sdpa", compile_layers=False, checkpoint_layers=None)


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


def run_trl(cfg: Config, tokenizer: Any, data: Any, device: torch.device, steps: int) -> list[dict]:
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, synchronized with the GPU."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            torch.cuda.synchronize(device)
            self.times.append(time.perf_counter() - self.start)

    model = load_base_model(trl_model_config(cfg.model), cfg.train.precision, device, cfg.train.seed)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(cfg, model, tokenizer, data.rows, steps + 1, Path(tmp), sequential=False, peft=True)
        trainer.add_callback(clock)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    per_step = cfg.train.grad_accum
    tokens = sum(trainer.token_counts[per_step:per_step * (steps + 1)])  # step 0 warms up
    row = {"side": "trl", "variant": "SFTTrainer", **summary(tokens, sum(clock.times[1:]), steps, n_params(cfg), device)}
    print(json.dumps(row), flush=True)
    return [row]


# ---------------------------------------------------------------- parity

def run_parity(cfg: Config, tokenizer: Any, data: Any, device: torch.device, steps: int) -> list[dict]:
    """Same initial adapter, same examples per step in the same order, dropout 0: per-step losses.
    Our side runs the levers the overrides turn on (e.g. model.attn_implementation=varlen
    data.packing=true model.compile_layers=true): packing regroups a step's examples into rows but
    keeps the step's examples, so the step's loss must still match."""
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0),
                              data=dataclasses.replace(cfg.data, group_by_length=False))
    order = data_order(data.rows, cfg.data, cfg.train, tokenizer.pad_token_id)
    ours_model = build_model(cfg.model, cfg.lora, cfg.train.precision, device, cfg.train.seed)
    optimizer = build_optimizer(ours_model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, steps)
    scaler = build_scaler(cfg.train.precision, device)
    meter, ours = MemoryMeter(device), []
    for step in range(steps):
        _, batches = order.batches(step)
        loss = train_step(ours_model, batches, scaler, cfg.train.precision, device, True, meter)
        optimizer_step(ours_model, optimizer, scheduler, scaler, cfg.train.max_grad_norm)
        ours.append(float(loss))
    del ours_model, optimizer
    torch.cuda.empty_cache()
    rows = [r for step in range(steps) for batch in order.window(step)[1] for r in batch]
    trl_model = build_model(trl_model_config(cfg.model), cfg.lora, cfg.train.precision, device, cfg.train.seed)  # same adapter
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(cfg, trl_model, tokenizer, rows, steps, Path(tmp), sequential=True, peft=False)
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
    print("| shape | side / lever | tokens/s | s/step | peak alloc GiB | peak reserved GiB | MFU | vs TRL tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sorted((r for r in runs if r["mode"] in ("ours", "trl")), key=lambda r: (r["shape"], r["mode"] == "ours")):
        for row in run["results"]:
            ref = trl.get(run["shape"])
            ratio = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            print(f"| {run['shape']} | {row['side']}: {row['variant']} | {row['tokens_per_s']:,.0f} | "
                  f"{row['s_per_step']:.2f} | {row['peak_allocated_gib']:.2f} | {row['peak_reserved_gib']:.2f} | "
                  f"{100 * row['mfu']:.1f}% | {ratio} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ours", "trl", "parity", "table"])
    p.add_argument("rest", nargs="*", help="config overrides; for table, result files")
    p.add_argument("--shape", choices=list(SHAPES), default="extractive_2048")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", type=Path)
    p.add_argument("--only-last", action="store_true", help="ours: time only the variant with every lever")
    p.add_argument("--skip", nargs="*", default=[], metavar="LEVER", help="ours: levers to leave out")
    args = p.parse_intermixed_args()
    if args.mode == "table":
        table([Path(x) for x in args.rest])
        return
    cfg, tokenizer, data, device = setup(args.shape, args.rest)
    if args.mode == "ours":
        results = run_ours(cfg, tokenizer, data, device, args.steps, args.only_last, tuple(args.skip))
    else:
        results = {"trl": run_trl, "parity": run_parity}[args.mode](cfg, tokenizer, data, device, args.steps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "mode": args.mode, "shape": args.shape, "steps": args.steps, "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(device), "versions": versions(), "command": " ".join(sys.argv),
            "results": results}, indent=1))


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
