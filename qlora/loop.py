"""The training step, written out.

    for each micro-batch of the window:   autocast -> forward -> summed token loss / window tokens
                                          -> scaled backward
    at the accumulation boundary:         unscale -> clip -> step (skipped on inf/nan) -> scaler
                                          update -> scheduler -> zero grads

`train_step` and `optimizer_step` are separate so a debugger can stop between them with the
accumulated gradients in hand; `fit` strings them together with logging.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qlora.attention import VARLEN, sequence_bounds
from qlora.batching import DataOrder
from qlora.checkpoint import save_checkpoint
from qlora.config import Config
from qlora.data import IGNORE
from qlora.errors import UserError
from qlora.logs import MetricsLog
from qlora.memory import (MemoryMeter, dump_history, format_breakdown, memory_line, start_history,
                          startup_breakdown, step_peak_gib, write_breakdown)
from qlora.model import DTYPES


class Diverged(UserError):
    """The loss or the gradients became non-finite where no GradScaler could skip the step."""
    exit_code = 4


class OutOfMemory(UserError):
    """CUDA ran out of memory; the message holds the failing step's memory and what to turn."""
    exit_code = 3


OOM_KNOBS = ("to lower the peak: train.batch_size (raise train.grad_accum to keep the effective "
             "batch), data.max_length, model.gradient_checkpointing=true, "
             "model.upcast_non_quantized=false, train.supervised_logits_only=true, "
             "train.optimizer=paged_adamw_8bit")


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str,
                     device: torch.device, supervised_logits_only: bool) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the batch's supervised tokens, in fp32."""
    labels = batch["labels"]
    kwargs = {}
    if supervised_logits_only:
        # ~10 of ~900 positions carry a label: run the LM head (32k x hidden) only at positions
        # that predict one in some row, instead of materialising [B, T, vocab] logits.
        positions = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
        kwargs["logits_to_keep"] = positions.to(device, non_blocking=True)
        targets = labels[:, positions + 1]
    else:
        targets = labels[:, 1:]
    for name in ("attention_mask", "position_ids"):  # padded rows have the one, packed rows the other
        if name in batch:
            kwargs[name] = batch[name].to(device, non_blocking=True)
    if model.config._attn_implementation == VARLEN:
        # sequence boundaries computed here on the CPU, so the 32 layers x 3 passes need no sync
        kwargs.update({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                       for k, v in sequence_bounds(batch).items()})
    with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
        out = model(input_ids=batch["input_ids"].to(device, non_blocking=True), use_cache=False, **kwargs)
    logits = out.logits if supervised_logits_only else out.logits[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(),
                           ignore_index=IGNORE, reduction="sum")


def train_step(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
               scaler: torch.amp.GradScaler, precision: str, device: torch.device,
               supervised_logits_only: bool, meter: MemoryMeter) -> torch.Tensor:
    """Forward and backward over one accumulation window; returns the window's mean token loss
    (a device tensor: reading it is a sync point, left to the caller).

    Each micro-batch's summed loss is divided by the supervised tokens of the *whole window*, so the
    accumulated gradient equals that of one batch holding every row (not a mean of per-batch means,
    which over-weights tokens of short batches: transformers PR 34191)."""
    window_tokens = sum(b["n_supervised"] for b in batches)
    total = torch.zeros((), device=device)
    for batch in batches:
        with meter.phase("forward"):
            loss = micro_batch_loss(model, batch, precision, device, supervised_logits_only) / window_tokens
        with meter.phase("backward"):
            scaler.scale(loss).backward()  # frees this micro-batch's activations
        total += loss.detach()
    return total


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                   max_grad_norm: float) -> tuple[float, bool]:
    """Unscale -> clip -> step -> update -> schedule -> zero. Returns (grad norm before clipping,
    whether GradScaler skipped the step because a gradient was inf/nan)."""
    scaler.unscale_(optimizer)  # grads back to true scale, so clipping sees real norms
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))  # sync point
    scale_before = scaler.get_scale()
    scaler.step(optimizer)  # no-op when unscale_ found inf/nan
    scaler.update()  # halves the scale after a skip, grows it after enough good steps
    skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
    scheduler.step()  # also after a skip: the schedule follows optimizer steps taken or skipped
    optimizer.zero_grad(set_to_none=True)  # frees gradient memory until the next backward
    return grad_norm, skipped


@dataclass(frozen=True)
class FitSettings:
    precision: str
    max_grad_norm: float
    supervised_logits_only: bool
    progress: bool
    memory_snapshot_steps: int = 0
    """Record every allocation for this many steps and dump memory_snapshot.pickle."""


@dataclass(frozen=True)
class CheckpointPlan:
    run_dir: Path
    every: int
    keep_last: int
    config: Config
    data_fingerprint: str


class StopSignal:
    """SIGINT/SIGTERM only set a flag: the loop finishes the optimizer step in flight, saves a
    checkpoint and returns, instead of dying half-way through a step."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name


@dataclass(frozen=True)
class FitResult:
    step: int
    """Optimizer steps done."""
    checkpoint: Path | None
    """The last checkpoint written."""
    interrupted: str | None
    """The signal that stopped the run early, if any."""
    peak_gib: float | None
    """Largest per-phase peak allocated over the steps run (CUDA only)."""


def fit(model: torch.nn.Module, order: DataOrder, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
        settings: FitSettings, device: torch.device, total_steps: int, metrics: MetricsLog,
        plan: CheckpointPlan, start_step: int = 0, progress: dict[str, Any] | None = None) -> FitResult:
    """Optimizer steps start_step .. total_steps-1, one metrics line each; checkpoints every
    `plan.every` steps, at the end, and when a stop signal arrives."""
    progress = dict(progress or {"skipped_total": 0, "elapsed_s": 0.0})
    meter = MemoryMeter(device)
    checkpoint, peak = None, None
    recording = start_history(settings.memory_snapshot_steps, device)
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
               disable=not settings.progress, unit="step")
    with StopSignal() as stop:
        for step in bar:
            try:
                record = run_step(model, order, optimizer, scheduler, scaler, settings, device, step,
                                  progress, meter)
            except torch.OutOfMemoryError:
                raise OutOfMemory(oom_report(step + 1, device)) from None
            metrics.write(record)
            step_peak = step_peak_gib(record["mem"])
            peak = max(filter(None, (peak, step_peak)), default=None)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", **peak_postfix(record, step_peak))
            done = step + 1
            if step == start_step:  # optimizer states exist only after the first step
                breakdown = startup_breakdown(model, optimizer, device)
                tqdm.write(format_breakdown(breakdown))
                write_breakdown(breakdown, plan.run_dir)
            if recording and done - start_step == settings.memory_snapshot_steps:
                dump_history(plan.run_dir / "memory_snapshot.pickle")
                recording = False
            if (plan.every and done % plan.every == 0) or done == total_steps or stop.received:
                check_adapter_finite(model, done)  # never write non-finite weights
                checkpoint = save_checkpoint(plan.run_dir, done, model, optimizer, scheduler, scaler,
                                             plan.config, plan.data_fingerprint, progress, plan.keep_last)
            if stop.received:
                return FitResult(step=done, checkpoint=checkpoint, interrupted=stop.received, peak_gib=peak)
    return FitResult(step=total_steps, checkpoint=checkpoint, interrupted=None, peak_gib=peak)


def peak_postfix(record: dict[str, Any], peak: float | None) -> dict[str, str]:
    return {"rss": f"{record['mem']['rss_gib']:.2f}G"} if peak is None else {"peak": f"{peak:.2f}G"}


def oom_report(step: int, device: torch.device) -> str:
    """What a user needs after an OOM: where memory stood, and which knobs lower the peak."""
    if device.type != "cuda":
        return f"out of memory in step {step}: {memory_line(device)}; {OOM_KNOBS}"
    return (f"CUDA out of memory in step {step}: {memory_line(device)}; "
            f"checkpoints already written are intact; {OOM_KNOBS}")


def run_step(model: torch.nn.Module, order: DataOrder, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
             settings: FitSettings, device: torch.device, step: int,
             progress: dict[str, Any], meter: MemoryMeter) -> dict[str, Any]:
    """One optimizer step (0-based `step`) and its metrics line; updates `progress` in place."""
    t0 = time.perf_counter()
    epoch, batches = order.batches(step)
    lr = scheduler.get_last_lr()[0]
    loss_t = train_step(model, batches, scaler, settings.precision, device, settings.supervised_logits_only,
                        meter)
    with meter.phase("optimizer"):
        grad_norm, skipped = optimizer_step(model, optimizer, scheduler, scaler, settings.max_grad_norm)
    loss = float(loss_t)  # sync point: once per optimizer step
    if not skipped and not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"step {step + 1}: loss {loss} / grad norm {grad_norm} is not finite and no "
                       f"GradScaler skipped it; stopping without saving")
    seconds = time.perf_counter() - t0
    progress["skipped_total"] += skipped
    progress["elapsed_s"] += seconds
    tokens = sum(b["n_tokens"] for b in batches)
    return {"step": step + 1, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "loss_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "skipped": skipped, "skipped_total": progress["skipped_total"], "tokens": tokens,
            "supervised_tokens": sum(b["n_supervised"] for b in batches),
            "tokens_per_s": tokens / seconds, "step_s": seconds, "elapsed_s": progress["elapsed_s"],
            "mem": meter.step_record()}


def check_adapter_finite(model: torch.nn.Module, step: int) -> None:
    """A sync point, run only before saving."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            raise Diverged(f"step {step}: adapter weight {name} is not finite; stopping without saving")
