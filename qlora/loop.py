"""The training loop, written out.

    train_step = accumulate_gradients + optimizer_step, one optimizer step:
      accumulate_gradients, for each micro-batch of the window:
                              autocast -> forward -> summed token loss / window tokens -> scaled backward
      optimizer_step, at the accumulation boundary:
                              collect gradients -> unscale -> clip -> step (skipped on inf/nan) -> scaler update -> scheduler
                              -> zero grads
    fit: train_step for each step, with metrics, progress bar, checkpoints and stop signals.

`--break-at STEP:PHASE` stops inside `train_step` through `breakpoint()` (see `StepSettings`).
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qlora.attention import BOUNDED, sequence_bounds
from qlora.batching import DataOrder
from qlora.checkpoint import CHECKPOINTS, Start, save_checkpoint, trainable_weights, trained_state
from qlora.config import Config, TrainConfig, peak_lowering_hints
from qlora.data import IGNORE
from qlora.debug import BreakAt, Phase
from qlora.distributed import (World, any_rank, barrier, clip_grad_norm, gather_to_main, share,
                               sum_adapter_gradients, sum_over_ranks, sync_gradients, unwrap)
from qlora.errors import UserError
from qlora.logs import MetricsLog
from qlora.memory import (MemoryMeter, dump_history, format_breakdown, memory_line, start_history,
                          startup_breakdown, step_peak_gib, write_breakdown)
from qlora.model import DTYPES
from qlora.optim import TrainingState


class Diverged(UserError):
    """The loss or the gradients became non-finite where no GradScaler could skip the step."""
    exit_code = 4


class OutOfMemory(UserError):
    """CUDA ran out of memory; the message holds the failing step's memory and what to turn."""
    exit_code = 3


@dataclass(frozen=True)
class StepSettings:
    precision: str
    max_grad_norm: float
    supervised_logits_only: bool
    break_at: BreakAt | None = None
    """Where train_step calls breakpoint() (qlora/debug.py)."""
    world: World = World()
    """The processes that share each step (qlora/distributed.py); one by default."""
    sharded: bool = False
    """The model is sharded over the ranks (model.shard): each runs as many micro-batches."""

    @staticmethod
    def of(train: TrainConfig, break_at: BreakAt | None = None, world: World = World(),
           sharded: bool = False) -> "StepSettings":
        return StepSettings(precision=train.precision, max_grad_norm=train.max_grad_norm,
                            supervised_logits_only=train.supervised_logits_only, break_at=break_at, world=world,
                            sharded=sharded)

    def stops_at(self, step: int, phase: Phase) -> bool:
        return self.break_at == BreakAt(step, phase)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor (on the CPU) to the device without making the host wait: CUDA copies from
    pinned, contiguous host memory are asynchronous, while one from ordinary (pageable) memory may
    wait for the stream and so keep the CPU from queueing layers ahead of the GPU. The pinned
    buffer stays reserved until its copy has run (PyTorch's pinned-memory cache)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def micro_batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str,
                     device: torch.device, supervised_logits_only: bool) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the batch's supervised tokens, in fp32."""
    labels = batch["labels"]
    kwargs = {}
    if supervised_logits_only:
        # ~10 of ~900 positions carry a label: run the LM head (32k x hidden) only at positions
        # that predict one in some row, instead of materialising [B, T, vocab] logits.
        positions = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().squeeze(1)
        kwargs["logits_to_keep"] = to_device(positions, device)
        targets = labels[:, positions + 1]
    else:
        targets = labels[:, 1:]
    targets = to_device(targets, device)  # queued with the inputs, not after the forward
    for name in ("attention_mask", "position_ids"):  # padded rows have the one, packed rows the other
        if name in batch:
            kwargs[name] = to_device(batch[name], device)
    if unwrap(model).config._attn_implementation in BOUNDED:
        # sequence boundaries computed here on the CPU, so the 32 layers x 3 passes need no sync
        kwargs.update({k: to_device(v, device) if torch.is_tensor(v) else v
                       for k, v in sequence_bounds(batch).items()})
    with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
        out = model(input_ids=to_device(batch["input_ids"], device), use_cache=False, **kwargs)
    logits = out.logits if supervised_logits_only else out.logits[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")


def accumulate_gradients(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
                         scaler: torch.amp.GradScaler, precision: str, device: torch.device,
                         supervised_logits_only: bool, meter: MemoryMeter,
                         window_tokens: int | None = None) -> torch.Tensor:
    """Forward and backward over one accumulation window (this rank's share of it); returns the
    window's mean token loss over these micro-batches (a device tensor: reading it is a sync point,
    left to the caller).

    Each micro-batch's summed loss is divided by the supervised tokens of the *whole window*
    (`window_tokens`, all ranks' micro-batches; default: these), so the accumulated gradient equals
    that of one batch holding every row (not a mean of per-batch means, which over-weights tokens of
    short batches: transformers PR 34191). With several ranks DDP sums their gradients at the last
    micro-batch's backward, or, sharded, `sum_adapter_gradients` after it (qlora/distributed.py)."""
    window_tokens = window_tokens or sum(b["n_supervised"] for b in batches)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if "dropout_seed" in batch:  # the masks follow the micro-batch, not the rank that runs it
            torch.manual_seed(batch["dropout_seed"])
        # DDP decides at the forward whether the backward all-reduces: both inside the context
        with sync_gradients(model, last=i == len(batches) - 1):
            with meter.phase("forward"):
                loss = (micro_batch_loss(model, batch, precision, device, supervised_logits_only)
                        * batch.get("weight", 1.0) / window_tokens)
            with meter.phase("backward"):
                scaler.scale(loss).backward()  # frees this micro-batch's activations
        total += loss.detach()
    sum_adapter_gradients(model)  # model.shard: the ranks' sum, which DDP makes in the last backward
    return total


def optimizer_step(state: TrainingState, max_grad_norm: float) -> tuple[float, bool]:
    """Collect (the flat tensor's gradients, qlora/optim.py) -> unscale -> clip -> step -> update
    -> schedule -> zero. Returns (grad norm before clipping, whether GradScaler skipped the step
    because a gradient was inf/nan)."""
    scaler = state.scaler
    state.collect_gradients()  # into the flat tensor the optimizer steps, where there is one
    scaler.unscale_(state.optimizer)  # grads back to true scale, so clipping sees real norms
    grad_norm = clip_grad_norm(state.stepped, state.gradients(), max_grad_norm)  # sync point
    scale_before = scaler.get_scale()
    scaler.step(state.optimizer)  # no-op when unscale_ found inf/nan
    scaler.update()  # halves the scale after a skip, grows it after enough good steps
    skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
    state.scheduler.step()  # also after a skip: the schedule follows optimizer steps taken or skipped
    state.zero_grad()  # frees gradient memory until the next backward
    return grad_norm, skipped


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean loss per supervised token of the window."""
    grad_norm: float
    skipped: bool
    supervised_tokens: int
    """The tokens the step's loss is normalized by (every rank's micro-batches)."""


def train_step(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], state: TrainingState,
               settings: StepSettings, device: torch.device, meter: MemoryMeter, step: int) -> StepResult:
    """Optimizer step `step` (1-based) over the step's micro-batches (this rank runs its share). In
    scope at each breakpoint(): model, batches, state (optimizer, scheduler, scaler), settings,
    device, meter; see the README."""
    if settings.stops_at(step, "window"):
        breakpoint()  # --break-at STEP:window
    world, supervised = settings.world, sum(b["n_supervised"] for b in batches)
    mine = share(batches, world, even=settings.sharded)
    loss_t = accumulate_gradients(model, mine, state.scaler, settings.precision, device,
                                  settings.supervised_logits_only, meter, window_tokens=supervised)
    if settings.stops_at(step, "optimizer"):
        breakpoint()  # --break-at STEP:optimizer
    with meter.phase("optimizer"):
        grad_norm, skipped = optimizer_step(state, settings.max_grad_norm)
    loss = float(sum_over_ranks(loss_t, world))  # sync point: once per optimizer step
    if not skipped and not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"step {step}: loss {loss} / grad norm {grad_norm} is not finite and no "
                       f"GradScaler skipped it; stopping without saving a checkpoint")
    if settings.stops_at(step, "end"):
        breakpoint()  # --break-at STEP:end
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=skipped, supervised_tokens=supervised)


@dataclass(frozen=True)
class SavePlan:
    """Where and when training state is saved (checkpoints/step-N), and by whom."""
    run_dir: Path
    every: int
    keep_last: int
    config: Config
    data_fingerprint: str
    writes: bool = True
    """This process writes the run's files (global rank 0); the others wait for each checkpoint."""


@dataclass(frozen=True)
class Watch:
    """What fit shows and records besides the metrics lines."""
    progress_bar: bool
    memory_snapshot_steps: int = 0
    """Record every allocation for this many steps and dump memory_snapshot.pickle (CUDA only)."""


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
    steps_run: int
    """Steps run by this process (fewer than `step` after a resume)."""
    seconds: float
    """Wall time of the steps this process ran."""
    median_tokens_per_s: float | None
    checkpoint: Path | None
    """The last checkpoint written."""
    interrupted: str | None
    """The signal that stopped the run early, if any."""
    peak_gib: float | None
    """Largest per-phase peak allocated over the steps run (CUDA only)."""
    peak_reserved_gib: float | None
    """Largest reserved memory over the steps run (CUDA only)."""
    peak_rss_gib: float
    """The process's peak resident memory."""


def fit(model: torch.nn.Module, order: DataOrder, state: TrainingState, settings: StepSettings,
        device: torch.device, total_steps: int, metrics: MetricsLog, saving: SavePlan, start: Start,
        watch: Watch) -> FitResult:
    """Optimizer steps start.step+1 .. total_steps, one metrics line each; checkpoints every
    `saving.every` steps, at the end, and when a stop signal arrives (on any rank: all stop at the
    same step)."""
    totals, world = dict(start.totals), settings.world
    meter = MemoryMeter(device)
    checkpoint, speeds, peak, reserved = None, [], None, None
    recording = start_history(watch.memory_snapshot_steps if saving.writes else 0, device)  # rank 0's
    bar = tqdm(range(start.step + 1, total_steps + 1), initial=start.step, total=total_steps,
               disable=not watch.progress_bar, unit="step")
    began = time.perf_counter()
    with StopSignal() as stop:
        for step in bar:
            try:
                record = timed_step(model, order, state, settings, device, step, totals, meter)
            except torch.OutOfMemoryError:
                raise OutOfMemory(oom_report(step, device, saving.config)) from None
            write_record(record, metrics, world)
            speeds.append(record["tokens_per_s"])
            step_peak = step_peak_gib(record["mem"])
            peak = max(filter(None, (peak, step_peak)), default=None)
            reserved = max(filter(None, (reserved, record["mem"]["peak_reserved_gib"])), default=None)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", **peak_postfix(record, step_peak))
            if step == start.step + 1:  # optimizer states exist only after the first step
                breakdown = startup_breakdown(unwrap(model), state.optimizer, device)
                tqdm.write(format_breakdown(breakdown))
                if saving.writes:
                    write_breakdown(breakdown, saving.run_dir)
            if recording and step - start.step == watch.memory_snapshot_steps:
                dump_history(saving.run_dir / "memory_snapshot.pickle")
                recording = False
            stopping = any_rank(stop.received is not None, world, device)  # a sync point across ranks
            if (saving.every and step % saving.every == 0) or step == total_steps or stopping:
                checkpoint = save_and_wait(model, state, saving, step, totals, world, device)
            if stopping or step == total_steps:
                return FitResult(step=step, steps_run=len(speeds), seconds=time.perf_counter() - began,
                                 median_tokens_per_s=statistics.median(speeds), checkpoint=checkpoint,
                                 interrupted=(stop.received or "a stop signal to another rank") if stopping else None,
                                 peak_gib=peak, peak_reserved_gib=reserved, peak_rss_gib=record["mem"]["peak_rss_gib"])
    raise AssertionError("unreachable: fit returns at the last step")


def write_record(record: dict[str, Any], metrics: MetricsLog, world: World) -> None:
    """One metrics line, by rank 0; with several ranks it carries every rank's memory peaks."""
    if world.size > 1:
        mems = gather_to_main(record["mem"], world)  # a sync point across ranks
        record["ranks"] = mems and [{"rank": r, "peak_gib": step_peak_gib(m), "peak_reserved_gib": m["peak_reserved_gib"],
                                     "peak_rss_gib": m["peak_rss_gib"]} for r, m in enumerate(mems)]
    metrics.write(record)


def save_and_wait(model: torch.nn.Module, state: TrainingState, saving: SavePlan, step: int,
                  totals: dict[str, Any], world: World, device: torch.device) -> Path:
    """Rank 0 writes the checkpoint (the adapters and optimizer states are the same on every rank);
    every rank waits until it is complete."""
    check_adapter_finite(model, step, world, device)  # never write non-finite weights
    path = saving.run_dir / CHECKPOINTS / f"step-{step:08d}"  # where rank 0 puts it
    if saving.writes:
        path = save_checkpoint(saving.run_dir, step, trained_state(model, state.optimizer), state, saving.config,
                               saving.data_fingerprint, totals, saving.keep_last, world_size=world.size)
    barrier(world)
    return path


def peak_postfix(record: dict[str, Any], peak: float | None) -> dict[str, str]:
    return {"rss": f"{record['mem']['rss_gib']:.2f}G"} if peak is None else {"peak": f"{peak:.2f}G"}


def oom_report(step: int, device: torch.device, cfg: Config) -> str:
    """What a user needs after an OOM: where memory stood, and which keys lower the peak (those
    the run's config has not already turned)."""
    where = "CUDA out of memory" if device.type == "cuda" else "out of memory"
    return (f"{where} in step {step}: {memory_line(device)}; checkpoints already written are intact; "
            f"to lower the peak: {peak_lowering_hints(cfg=cfg)}")


def timed_step(model: torch.nn.Module, order: DataOrder, state: TrainingState, settings: StepSettings,
               device: torch.device, step: int, totals: dict[str, Any], meter: MemoryMeter) -> dict[str, Any]:
    """One optimizer step (1-based `step`) and its metrics line; updates `totals` in place."""
    t0 = time.perf_counter()
    epoch, batches = order.batches(step - 1)
    lr = state.scheduler.get_last_lr()[0]
    result = train_step(model, batches, state, settings, device, meter, step)
    seconds = time.perf_counter() - t0
    totals["skipped_total"] += result.skipped
    totals["elapsed_s"] += seconds
    tokens = sum(b["n_tokens"] for b in batches)
    return {"step": step, "epoch": epoch, "world_size": settings.world.size, "loss": result.loss, "lr": lr,
            "grad_norm": result.grad_norm,
            "loss_scale": state.scaler.get_scale() if state.scaler.is_enabled() else None,
            "skipped": result.skipped, "skipped_total": totals["skipped_total"], "tokens": tokens,
            "supervised_tokens": result.supervised_tokens,
            "tokens_per_s": tokens / seconds, "step_s": seconds, "elapsed_s": totals["elapsed_s"],
            "mem": meter.step_record()}


def check_adapter_finite(model: torch.nn.Module, step: int, world: World, device: torch.device) -> None:
    """A sync point across ranks, run only before saving: all ranks must stop together."""
    bad = next((name for name, w in trainable_weights(model).items() if not bool(torch.isfinite(w).all())), None)
    if any_rank(bad is not None, world, device):
        where = f"adapter weight {bad}" if bad else "an adapter weight on another rank"
        raise Diverged(f"step {step}: {where} is not finite; stopping without saving a checkpoint")
