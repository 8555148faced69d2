"""The memory plan: with `train.memory_budget_gib`, the fastest setting the memory estimate says fits
the budget, chosen before the model loads.

What it plans today: how many decoder layers recompute their activations (all, the first N, none).
Recompute changes the speed and the memory, never the gradient, so a plan may change between a run
and its resume. A config that sets `model.recompute_layers` or `model.recompute_activations` itself
keeps its value (explicit values win), and the run says how its estimate compares with the budget.

Speed model: a step with every layer recomputed takes 1 + RECOMPUTE_COST times one with none, each
recomputed layer a 1/L share of that (fitted on one H100, Llama-2-7B, extractive @2048). The
estimate behind it is on the safe side, except for eager attention, which it does not price: a
budget is refused with eager attention (README, "Where the memory goes").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qlora.config import Config, peak_lowering_hints
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.memory import GIB

RECOMPUTE_COST = 0.505
"""Llama-2-7B, configs/llama2-7b-korquad.yaml, one H100 (an earlier session's train.py runs, steps
3-14, reported in issue 14; the result files were not kept): 16,916 tokens/s with no layer
recomputed, 11,237 with all 32; the linear share predicts 14,230 for 12 of 32, measured 13,960."""
PLANNED_KEYS = ("model.recompute_activations", "model.recompute_layers")


@dataclass(frozen=True)
class Plan:
    recomputed: int
    """How many decoder layers (the first ones) recompute: 0 none, `layers` all."""
    layers: int
    peak_bytes: int
    """The estimate's peak allocated bytes."""

    @property
    def speed(self) -> float:
        """Tokens/s relative to recomputing every layer."""
        return (1 + RECOMPUTE_COST) / (1 + RECOMPUTE_COST * self.recomputed / self.layers)

    def describe(self) -> str:
        return f"recompute {self.recomputed} of {self.layers} layers"

    def apply(self, cfg: Config) -> Config:
        """model.recompute_layers counts the same layers, with null for all of them."""
        model = dataclasses.replace(cfg.model, recompute_activations=self.recomputed > 0,
                                    recompute_layers=None if self.recomputed in (0, self.layers) else self.recomputed)
        return dataclasses.replace(cfg, model=model)


def candidates(cfg: Config, hf_config: Any, seq: int) -> list[Plan]:
    """Every recompute count, fastest (none) first, each with the estimate's peak for this config."""
    layers = hf_config.num_hidden_layers
    plans = [Plan(n, layers, 0) for n in range(layers + 1)]
    return [dataclasses.replace(p, peak_bytes=estimate_for_config(p.apply(cfg), hf_config, seq)["total"])
            for p in plans]


def choose(cfg: Config, hf_config: Any, seq: int, given: set[str]) -> tuple[Config, list[Plan], Plan | None]:
    """(the config to run, the candidates, the chosen plan). No budget, or a config that sets the
    planned keys itself: the config as it is, and no plan. Nothing fits: a UserError that names the
    smallest budget that does."""
    budget = cfg.train.memory_budget_gib
    if budget is None or given & set(PLANNED_KEYS):
        return cfg, [], None
    if cfg.model.attn_implementation == "eager":
        raise UserError("train.memory_budget_gib: the memory estimate does not price eager attention's scores "
                        "(Gemma-2 measured up to 36% above it), so no plan can be trusted; set "
                        "model.recompute_layers yourself")
    plans = candidates(cfg, hf_config, seq)
    fitting = [p for p in plans if p.peak_bytes <= budget * GIB]
    if not fitting:
        smallest = min(plans, key=lambda p: p.peak_bytes)
        raise UserError(f"train.memory_budget_gib={budget:g}: no plan fits; the smallest ({smallest.describe()}) "
                        f"needs {smallest.peak_bytes / GIB:.2f} GiB. Also lowers the peak: {peak_lowering_hints(leave_out=PLANNED_KEYS)}")
    best = fitting[0]  # candidates run from no layer recomputed (fastest) to all
    return best.apply(cfg), plans, best


def format_plans(plans: list[Plan], chosen: Plan, budget_gib: float) -> str:
    """The table --estimate-memory prints: each candidate's predicted peak and relative speed."""
    lines = [f"memory plans for a budget of {budget_gib:g} GiB (peak allocated as estimated; speed relative "
             f"to recomputing every layer):"]
    for p in plans:
        mark = "  <- chosen" if p == chosen else ("" if p.peak_bytes <= budget_gib * GIB else "  (over budget)")
        lines.append(f"  {p.describe():<28} {p.peak_bytes / GIB:8.3f} GiB  {p.speed:5.2f}x{mark}")
    return "\n".join(lines)
