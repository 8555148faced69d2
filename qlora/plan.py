"""The memory plan: the fastest setting the memory estimate says fits `train.memory_budget_gib`
(a number, or `auto`: the GPU's free memory at start, less a margin), chosen before the model loads.

What it plans: how many decoder layers recompute their activations (all, the first N, none),
whether the others are lean (model.lean_layers: they save less and recompute part of themselves in
their backward), and, only where nothing fits the config's packed rows, shorter rows (halves of
the config's row length, down to data.max_length); then, on a GPU, one recomputing layer in
OFFLOAD_EVERY offloading its activations instead (model.offload_layers), where the budget holds
what that adds (nothing with six or more layers kept: qlora/estimate.py); then, in the memory
left, how many layers keep their base weights dequantized (model.dequantized_layers). Neither of
the last two under model.shard. Each recompute count is priced with the other layers kept and, as
measured (compiled Llama-layout layers, one process), lean (these without offloading: the pair is
not measured), with and without offloading, and on one GPU with the recomputing layers' inputs on
the GPU and in host memory (model.offload_inputs: less memory, the same speed to the speed model);
the fastest, once what it leaves is spent, wins, the first of equals preferred (fewer recomputed
layers, kept layers not lean, no offloading, inputs on the GPU).
Recompute, offloaded and dequantized layers never change the gradient; lean layers keep it too,
but on CUDA they draw other LoRA dropout masks than kept layers (as compiled layers do). Shorter
rows group the same examples a step into more rows: the same step, up to floating-point order and
the LoRA dropout masks, which are drawn per row. All of these may change between a run and its
resume (a resume that plans other rows, or other lean layers on CUDA, is then not bit for bit the
unbroken run). A config that sets `model.recompute_layers` or `model.recompute_activations` itself
keeps its value (rows still shortened where they do not fit, and nothing else planned where they
do), one that sets `data.pack_length` keeps its rows, one that sets `model.lean_layers` its value,
and one that sets `model.offload_layers` or `model.dequantized_layers` its count (explicit values
win). A sharded model (model.shard) plans rows only, every layer recomputed: fewer recomputed
layers under FSDP have not been measured.

Speed model: a step with every layer recomputed takes 1 + RECOMPUTE_COST times one with none, each
recomputed layer a 1/L share of that (fitted on one H100, Llama-2-7B, extractive @2048); each lean
layer adds a 1/L share of LEAN_COST; each dequantized layer takes a 1/L share of DEQUANTIZED_GAIN
off (one H200); an offloaded layer is priced as one that keeps its activations (OFFLOAD_EVERY says
how far that held). The estimate behind it is on the safe side, except for eager attention, which
it does not price: a budget given as a number is refused with eager attention, and `auto` plans nothing there (README,
"Where the memory goes"). Shorter rows are slower per token, by an amount not priced here: each row
pays the CPU's launches of every layer (at rows of 8,192 about the GPU's own time; rows of 2,048 with nothing
recomputed ran 0.64x the config's rows of 8,192 with 25 of 32 layers recomputed, one H200,
bench/results/2026-11-28-session10-h200/), the 4-bit weights' dequantization and, under sharding,
their gathering. So they are a last resort, the longest that fits chosen. Longer rows than the
config's are not planned (with the whole card, 16,384 beat 8,192 only on steps whose rows of 8,192
left a nearly empty third row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from qlora.batching import pack_length
from qlora.config import Config, peak_lowering_hints
from qlora.distributed import launched_ranks, local_device
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.memory import GIB
from qlora.offload import most_offloaded

DEQUANTIZED_GAIN = 0.040
"""A step with every layer's base dequantized once (model.dequantized_layers) takes 1 - DEQUANTIZED_GAIN
times one that dequantizes in each pass, each layer a 1/L share: Llama-2-7B, the shipped config
with nothing recomputed, one H200, 0.858 -> 0.823 s a step over steps 3-12
(bench/results/2026-11-29-session11-h200/call-a/). A recomputed layer dequantizes three times a row
instead of two, so it gains more; not priced (the plan spends memory on recompute first anyway:
a layer kept from recompute buys about three times the speed a GiB that dequantizing buys)."""
RECOMPUTE_COST = 0.505
"""Llama-2-7B, configs/llama2-7b-korquad.yaml, one H100 (an earlier session's train.py runs, steps
3-14, reported in issue 14; the result files were not kept): 16,916 tokens/s with no layer
recomputed, 11,237 with all 32; the linear share predicts 14,230 for 12 of 32, measured 13,960."""
OFFLOAD_EVERY = 6
"""One recomputing layer in OFFLOAD_EVERY offloads its activations instead, so each one's host
copies have the forward of the layers up to the next one to run in: a layer of Llama-2-7B at rows
of 8,192 copies about 0.93 GB each way, 17 ms at an H200's 54 GB/s, about four layers' forward.
Measured (the shipped config, a 15.5 GiB budget, recompute 24 of 32 layers, one H200, steps 3-14,
bench/results/2026-11-29-session13-h200/call-a): 12,692 tokens/s with none offloaded, 13,257 with
4 (the model prices 1.05x; 4.4% measured), at a peak 0.24 GiB lower. No other spacing was
measured with the host memory reused (session 12's calls A-D allocated it per tensor and ran slower
at every count). Measured on Llama-2-7B, in one process, on this GPU only: a slower GPU hides longer
copies, a smaller model's layers copy more bytes per FLOP, and torchrun's ranks share the host's
links (the plan offloads in one process only)."""
LEAN_COST = 0.25
"""A step with every layer lean (model.lean_layers) takes 1 + LEAN_COST times one with every layer
kept, each lean layer a 1/L share. Llama-2-7B, the shipped job, one H200 a call (steps 2-6,
bench/results/2026-11-29-session15-h200/): 17,887 tokens/s with every layer kept and 14,603 with
every layer lean, the dropout masks saved (calls B and C, one machine: 0.225); with them replayed on
CUDA, as now, 14,262 with every layer lean and 13,305 with 8 recomputed (call D, another machine:
0.17 from that pair and RECOMPUTE_COST), and 3.3% slower than saving the masks at 8 recomputed."""
PLANNED_KEYS = ("model.recompute_activations", "model.recompute_layers")
ROWS_KEY, DEQUANTIZED_KEY, OFFLOAD_KEY = "data.pack_length", "model.dequantized_layers", "model.offload_layers"
INPUTS_KEY, LEAN_KEY = "model.offload_inputs", "model.lean_layers"
AUTO_MARGIN, AUTO_MIN_MARGIN_GIB, AUTO_TORCHRUN_GIB = 0.08, 1.0, 1.25
"""`auto` leaves 8% of the free memory (at least 1 GiB) unplanned: the allocator reserves 3% + 0.3 GiB
over the peak it allocates (H200, bench/results/2026-11-28-session6-h200/), and the rest is room for
what the estimate was not fitted on (it sits 1.5-5% above the measured peaks it was). Under torchrun
another 1.25 GiB: NCCL's buffers, outside the allocator, came to 1.2 GiB per rank on 2 H200s
(bench/results/2026-11-28-session6-h200x2/gpu2-kept.log: 1.93 GiB of context and other, 0.75 alone)."""


@dataclass(frozen=True)
class Budget:
    gib: float
    """Peak allocated GiB to plan for."""
    automatic: bool
    """From the GPU's free memory (train.memory_budget_gib=auto), not a number in the config."""
    limit: str = "the free GPU memory"
    """What an automatic budget is that memory less a margin of: the free memory, or a smaller cap."""

    def describe(self) -> str:
        return f"{self.gib:g} GiB {f'budget (auto: {self.limit} less a margin)' if self.automatic else 'budget'}"


def auto_budget_gib(free_bytes: int, ranks: int = 1) -> float:
    free = free_bytes / GIB
    return round(free - max(AUTO_MIN_MARGIN_GIB, AUTO_MARGIN * free) - (AUTO_TORCHRUN_GIB if ranks > 1 else 0), 2)


def resolve_budget(cfg: Config) -> Budget | None:
    """The budget to plan for: the config's number, or with `auto` this process's GPU's free memory
    less the margin (each torchrun rank plans for its own GPU), and no more than
    train.memory_cap_gib less the margin (the cap bounds the allocator only: the CUDA context and
    NCCL's buffers are outside it); None: no plan (null, or `auto` without a GPU)."""
    setting, cap = cfg.train.memory_budget_gib, cfg.train.memory_cap_gib
    most = None if cap is None else auto_budget_gib(int(cap * GIB))
    if setting != "auto":
        if setting is not None and most is not None and setting > most:
            raise UserError(f"train.memory_budget_gib={setting:g} leaves no room under train.memory_cap_gib={cap:g} "
                            f"for the allocator's slack: at most {most:g}")
        return None if setting is None else Budget(setting, automatic=False)
    device = local_device(cfg.train.device)  # this rank's GPU (cuda:0 would get every rank's context)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)  # creates this process's CUDA context first: it is not free
    budget = auto_budget_gib(free, launched_ranks())
    if most is not None and most < budget:
        return Budget(most, automatic=True, limit=f"train.memory_cap_gib={cap:g}")
    return Budget(budget, automatic=True)


@dataclass(frozen=True)
class Plan:
    recomputed: int
    """How many decoder layers (the first ones) recompute: 0 none, `layers` all."""
    layers: int
    peak_bytes: int
    """The estimate's peak allocated bytes."""
    rows: int | None = None
    """Tokens per packed row where the plan shortens the config's rows (None: the config's)."""
    dequantized: int = 0
    """How many decoder layers (the first ones) keep their base weights dequantized."""
    offloaded: int = 0
    """How many of the recomputing layers offload their activations instead."""
    inputs: bool = False
    """Whether the recomputing layers keep their inputs in host memory (model.offload_inputs)."""
    lean: bool = False
    """Whether the layers that neither recompute nor offload are lean (model.lean_layers)."""

    @property
    def speed(self) -> float:
        """Tokens/s relative to recomputing every layer and dequantizing none (at the same rows)."""
        lean = LEAN_COST * (self.layers - self.recomputed) / self.layers if self.lean else 0
        return (1 + RECOMPUTE_COST) / ((1 + RECOMPUTE_COST * (self.recomputed - self.offloaded) / self.layers + lean)
                                       * (1 - DEQUANTIZED_GAIN * self.dequantized / self.layers))

    def describe(self) -> str:
        rows = f", rows of {self.rows} tokens" if self.rows else ""  # None: the config's rows
        dequantized = f", {self.dequantized} dequantized" if self.dequantized else ""
        notes = [*(["inputs in host memory"] if self.inputs and self.recomputed else []),
                 *([f"{self.offloaded} of them offload instead"] if self.offloaded else [])]
        notes_text = f" ({', '.join(notes)})" if notes else ""
        lean = ", the rest lean" if self.lean and self.recomputed < self.layers else ""
        return f"recompute {self.recomputed} of {self.layers} layers{notes_text}{lean}{rows}{dequantized}"

    def apply(self, cfg: Config) -> Config:
        """model.recompute_layers counts the same layers, with null for all of them."""
        model = dataclasses.replace(cfg.model, recompute_activations=self.recomputed > 0,
                                    recompute_layers=None if self.recomputed in (0, self.layers) else self.recomputed,
                                    dequantized_layers=self.dequantized or cfg.model.dequantized_layers,
                                    offload_layers=self.offloaded, offload_inputs=self.inputs and self.recomputed > 0,
                                    lean_layers=self.lean)
        data = dataclasses.replace(cfg.data, pack_length=self.rows) if self.rows else cfg.data
        return dataclasses.replace(cfg, model=model, data=data)


def row_lengths(cfg: Config, given: set[str]) -> list[int | None]:
    """The config's rows (None), then halves of them down to data.max_length: with packing on and
    data.pack_length not set by the config."""
    if not cfg.data.packing or ROWS_KEY in given:
        return [None]
    shorter, rows = [], pack_length(cfg.data, cfg.train) // 2
    while rows >= cfg.data.max_length:
        shorter.append(rows)
        rows //= 2
    return [None, *shorter]


def candidates(cfg: Config, hf_config: Any, seq: int, ranks: int = 1, rows: int | None = None,
               own_recompute: bool = False, inputs: tuple[bool, ...] = (False,),
               leans: tuple[bool, ...] = (False,)) -> list[Plan]:
    """Every recompute count (sharded: every layer only; `own_recompute`: the config's), none first,
    each with the estimate's peak for this config on `ranks` processes, at `rows` tokens per packed
    row; each count with the other layers kept and/or lean, as `leans` says, and the recomputing
    layers' inputs on the GPU and/or in host memory, as `inputs` says (the same speed: the first is
    preferred)."""
    layers = hf_config.num_hidden_layers
    counts = [recomputed_layers(cfg, layers)] if own_recompute else \
        [layers] if cfg.model.shard else range(layers + 1)
    plans = [Plan(n, layers, 0, rows, offloaded=own_offloaded(cfg, n, layers), inputs=held, lean=lean)
             for n in counts for lean in (leans if n < layers else leans[:1])  # every layer recomputed: none kept
             for held in (inputs if n and not lean else inputs[:1])]  # nothing recomputed: no inputs kept
    return [dataclasses.replace(p, peak_bytes=estimate_for_config(p.apply(cfg), hf_config, seq, ranks)["total"])
            for p in plans]


def own_offloaded(cfg: Config, recomputed: int, layers: int) -> int:
    """The config's model.offload_layers, as many as `recomputed` layers allow (qlora/offload.py)."""
    return min(cfg.model.offload_layers, most_offloaded(recomputed, layers))


def recomputed_layers(cfg: Config, layers: int) -> int:
    """How many layers the config itself recomputes."""
    if not cfg.model.recompute_activations:
        return 0
    return layers if cfg.model.recompute_layers is None else min(cfg.model.recompute_layers, layers)


@dataclass(frozen=True)
class Choice:
    config: Config
    """The config to run: the chosen plan applied, or the config as it is."""
    plans: list[Plan]
    chosen: Plan | None
    reason: str | None = None
    """Why nothing was planned (None with a plan, or without a budget)."""


EAGER = "the memory estimate does not price eager attention's scores (Gemma-2 measured up to 36% above it)"


def choose(cfg: Config, hf_config: Any, seq: int, given: set[str], budget: Budget | None,
           ranks: int = 1, gpu: bool = False) -> Choice:
    """The fastest candidate within the budget at the longest rows where one fits (a config that
    sets the recompute keys itself: its own recompute, at the longest rows that fit). The config as
    it is: without a budget, with eager attention (auto budget), and when the config sets the
    recompute keys and its rows fit or may not change. With an auto budget and nothing fitting, the
    smallest plan. A budget given as a number is refused instead: with eager attention, or when
    nothing fits (the message names the smallest budget that does). `gpu`: the run is on a GPU,
    where some recomputing layers may offload instead (one process only)."""
    if budget is None:
        return Choice(cfg, [], None)
    if cfg.model.attn_implementation == "eager":
        if budget.automatic:
            return Choice(cfg, [], None, EAGER)
        raise UserError(f"train.memory_budget_gib: {EAGER}, so no plan can be trusted; set "
                        f"model.recompute_layers yourself")
    fixed, lengths = [k for k in PLANNED_KEYS if k in given], row_lengths(cfg, given)
    own = f"the config sets {' and '.join(fixed)} itself"
    if fixed and len(lengths) == 1:
        return Choice(cfg, [], None, own)
    plans, inputs = [], input_choices(cfg, given, ranks, gpu, bool(fixed))
    leans = lean_choices(cfg, hf_config, given, ranks, bool(fixed))
    for rows in lengths:
        plans += candidates(cfg, hf_config, seq, ranks, rows, own_recompute=bool(fixed), inputs=inputs, leans=leans)
        fitting = [p for p in plans if p.peak_bytes <= budget.gib * GIB]
        if fitting and fixed and fitting[0].rows is None:
            return Choice(cfg, plans, None, own)
        if fitting:  # the fastest once the memory each leaves is spent (the first of equals: fewest recomputed)
            chosen = max((spend_the_rest(p, cfg, hf_config, seq, ranks, budget, given, gpu) for p in fitting),
                         key=lambda p: p.speed)
            return Choice(chosen.apply(cfg), plans, chosen)
    smallest = min(plans, key=lambda p: p.peak_bytes)
    needs = f"the smallest plan ({smallest.describe()}) needs {smallest.peak_bytes / GIB:.2f} GiB"
    if budget.automatic:  # the least memory there is; it may still fit (the estimate is on the safe side)
        return Choice(smallest.apply(cfg), plans, None,
                      f"nothing fits {budget.limit} ({needs}), so it runs and may run out of memory")
    planned = (*PLANNED_KEYS, *([DEQUANTIZED_KEY] if DEQUANTIZED_KEY not in given else []),
               *([LEAN_KEY] if True in leans else []),
               *([ROWS_KEY] if len(lengths) > 1 else []))
    raise UserError(f"train.memory_budget_gib={budget.gib:g}: no plan fits; {needs}. Also lowers the peak: "
                    f"{peak_lowering_hints(leave_out=planned, cfg=cfg)}")


def input_choices(cfg: Config, given: set[str], ranks: int, gpu: bool, fixed: bool) -> tuple[bool, ...]:
    """Where the plans may keep the recomputing layers' inputs: on the GPU, or also in host memory
    on one GPU in one process (with torchrun's ranks sharing the host's links, not measured), with
    the non-reentrant recompute and no sharding. The config's own model.offload_inputs where it
    sets that key or its recompute keys (its own recompute runs with its own inputs setting)."""
    if INPUTS_KEY in given or fixed or not gpu or ranks > 1 or cfg.model.shard or cfg.model.recompute_reentrant:
        return (cfg.model.offload_inputs,)
    return (False, True)


def lean_choices(cfg: Config, hf_config: Any, given: set[str], ranks: int, fixed: bool) -> tuple[bool, ...]:
    """Whether the kept layers may be lean: as measured (compiled Llama-layout layers, one process,
    no offloading, varlen or SDPA attention, unsharded), where the config sets neither
    model.lean_layers nor its recompute keys (else its own value)."""
    measured = (cfg.model.compile_layers and hf_config.model_type == "llama" and ranks == 1 and not cfg.model.shard
                and cfg.model.attn_implementation != "flex" and not cfg.model.offload_layers
                and not cfg.model.offload_inputs)
    if LEAN_KEY in given or fixed or not measured:
        return (cfg.model.lean_layers,)
    return (False, True)


def spend_the_rest(plan: Plan, cfg: Config, hf_config: Any, seq: int, ranks: int, budget: Budget,
                   given: set[str], gpu: bool) -> Plan:
    """The fastest of `plan` and `plan` with offloaded layers (on a GPU, one process; not beside lean
    layers, a pair not measured), each then with dequantized layers in the memory the budget leaves
    it; not where the config sets them, nor under model.shard. Offloading may leave less room for
    dequantized layers than it gains."""
    options = [plan]
    if gpu and ranks == 1 and OFFLOAD_KEY not in given and not cfg.model.shard and not plan.lean:
        options.append(with_offloaded(plan, cfg, hf_config, seq, ranks, budget))
    if DEQUANTIZED_KEY not in given and not cfg.model.shard:
        options = [with_dequantized(option, cfg, hf_config, seq, ranks, budget) for option in options]
    return max(options, key=lambda option: option.speed)  # the first of equals: no offloading


def with_offloaded(plan: Plan, cfg: Config, hf_config: Any, seq: int, ranks: int, budget: Budget) -> Plan:
    """`plan` with one recomputing layer in OFFLOAD_EVERY offloading instead, where the budget holds
    what offloading may add (with few layers kept: estimate.py)."""
    more = dataclasses.replace(plan, offloaded=plan.recomputed // OFFLOAD_EVERY)
    peak = estimate_for_config(more.apply(cfg), hf_config, seq, ranks)["total"]
    return dataclasses.replace(more, peak_bytes=peak) if more.offloaded and peak <= budget.gib * GIB else plan


def with_dequantized(plan: Plan, cfg: Config, hf_config: Any, seq: int, ranks: int, budget: Budget) -> Plan:
    """`plan` (within the budget) with as many dequantized layers as the budget has room for beside
    it (model.dequantized_layers). Each one adds to the peak, so a bisection finds the most: the
    plan prices every fitting recompute count this way."""
    def peak(n: int) -> int:
        return estimate_for_config(dataclasses.replace(plan, dequantized=n).apply(cfg), hf_config, seq, ranks)["total"]

    fits, over = 0, plan.layers + 1  # the most known to fit, the fewest known not to
    while over - fits > 1:
        middle = (fits + over) // 2
        fits, over = (middle, over) if peak(middle) <= budget.gib * GIB else (fits, middle)
    return dataclasses.replace(plan, dequantized=fits, peak_bytes=peak(fits)) if fits else plan


def format_plans(plans: list[Plan], chosen: Plan, budget: Budget) -> str:
    """The table --estimate-memory prints: each candidate's predicted peak and relative speed."""
    lines = [f"memory plans for a {budget.describe()}; peak allocated as estimated, speed relative "
             f"to recomputing every layer:"]
    for p in plans + ([chosen] if chosen not in plans else []):  # the chosen plan, with what it spends, last
        mark = "  <- chosen" if p == chosen else ("" if p.peak_bytes <= budget.gib * GIB else "  (over budget)")
        lines.append(f"  {p.describe():<50} {p.peak_bytes / GIB:8.3f} GiB  {p.speed:5.2f}x{mark}")
    return "\n".join(lines)
