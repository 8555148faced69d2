"""The memory plan: with `train.memory_budget_gib`, the fastest setting the memory estimate says fits
the budget, chosen before the model loads.

What it plans today: how many decoder layers recompute their activations (all, the first N, none).
Recompute changes the speed and the memory, never the gradient, so a plan may change between a run
and its resume. A config that sets `model.recompute_layers` or `model.recompute_activations` itself
keeps its value: explicit values win.

Speed model: a step with every layer recomputed takes 1 + RECOMPUTE_COST times one with none, each
recomputed layer a 1/L share of that (fitted on one H100, Llama-2-7B, extractive @2048).
The estimate behind it is on the safe side (README, "Where the memory goes").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qlora.config import Config
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.memory import GIB

RECOMPUTE_COST = 0.505
"""Llama-2-7B, configs/llama2-7b-korquad.yaml, one H100 (an earlier session's train.py runs, steps
3-14): 16,916 tokens/s with no layer recomputed, 11,237 with all 32; the linear share predicts
14,230 for 12 of 32, measured 13,960."""
PLANNED_KEYS = ("model.recompute_activations", "model.recompute_layers")
LOWER_OTHERWISE = ("train.batch_size", "data.max_length", "data.pack_length", "model.upcast_non_quantized=false")
"""What else lowers the peak, named when no plan fits."""


@dataclass(frozen=True)
class Plan:
    recompute_layers: int
    """Decoder layers that recompute (0: none, L: all)."""
    layers: int
    peak_bytes: int
    """The estimate's peak allocated bytes."""

    @property
    def speed(self) -> float:
        """Tokens/s relative to recomputing every layer."""
        return (1 + RECOMPUTE_COST) / (1 + RECOMPUTE_COST * self.recompute_layers / self.layers)

    def describe(self) -> str:
        return f"recompute {self.recompute_layers} of {self.layers} layers"

    def apply(self, cfg: Config) -> Config:
        n = self.recompute_layers
        model = dataclasses.replace(cfg.model, recompute_activations=n > 0,
                                    recompute_layers=None if n == self.layers else (n or None))
        return dataclasses.replace(cfg, model=model)


def candidates(cfg: Config, hf_config: Any, seq: int) -> list[Plan]:
    """Every recompute count, fastest first, each with the estimate's peak for this config."""
    layers = hf_config.num_hidden_layers
    plans = []
    for n in range(layers + 1):
        plan = Plan(n, layers, 0)
        peak = estimate_for_config(plan.apply(cfg), hf_config, seq)["total"]
        plans.append(dataclasses.replace(plan, peak_bytes=peak))
    return plans


def choose(cfg: Config, hf_config: Any, seq: int, given: set[str]) -> tuple[Config, list[Plan], Plan | None]:
    """(the config to run, the candidates, the chosen plan). No budget, or a config that sets the
    planned keys itself: the config as it is, and no plan. Nothing fits: a UserError that names the
    smallest budget that does."""
    budget = cfg.train.memory_budget_gib
    if budget is None or given & set(PLANNED_KEYS):
        return cfg, [], None
    plans = candidates(cfg, hf_config, seq)
    fitting = [p for p in plans if p.peak_bytes <= budget * GIB]
    if not fitting:
        smallest = min(p.peak_bytes for p in plans)
        raise UserError(f"train.memory_budget_gib={budget:g}: no plan fits; the smallest (every layer recomputed) "
                        f"needs {smallest / GIB:.2f} GiB (also lower: {', '.join(LOWER_OTHERWISE)})")
    best = fitting[0]  # candidates run from no layer recomputed (fastest) to all
    return best.apply(cfg), plans, best


def format_plans(plans: list[Plan], chosen: Plan, budget_gib: float) -> str:
    """The table --estimate-memory prints: each candidate's predicted peak and relative speed."""
    lines = [f"memory plans for a budget of {budget_gib:g} GiB (peak allocated as estimated; speed relative "
             f"to recomputing every layer):"]
    for p in plans:
        mark = "  <- chosen" if p == chosen else ("" if p.peak_bytes <= budget_gib * GIB else "  (over budget)")
        lines.append(f"  {p.describe():<28} {p.peak_bytes / GIB:7.2f} GiB  {p.speed:5.2f}x{mark}")
    return "\n".join(lines)
