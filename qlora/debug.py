"""`--break-at STEP[:PHASE]`: where the loop calls breakpoint() (qlora/loop.py, `train_step`), so
PYTHONBREAKPOINT picks the debugger (pdb by default; ipdb, or debugpy for VS Code). No torch here:
train.py parses the flag before the heavy libraries load."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

Phase = Literal["window", "optimizer", "end"]
BREAK_PHASES: tuple[Phase, ...] = ("window", "optimizer", "end")
"""window: the step's micro-batches collated, no forward yet, gradients empty;
optimizer: every micro-batch's backward done, gradients accumulated and still loss-scaled;
end: the optimizer stepped and the loss read."""


@dataclass(frozen=True)
class BreakAt:
    step: int
    """Optimizer step, 1-based as in metrics.jsonl."""
    phase: Phase


def parse_break_at(text: str) -> BreakAt:
    """argparse type of --break-at: "5" (phase window) or "5:optimizer"."""
    step, _, phase = text.partition(":")
    phase = phase or "window"
    if not step.isdigit() or int(step) < 1 or phase not in BREAK_PHASES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected STEP[:PHASE] with STEP >= 1 and PHASE one of {', '.join(BREAK_PHASES)}")
    return BreakAt(int(step), phase)
