"""Lean layers (model.lean_layers): compiled decoder layers that save the fewest activations the
compiler can for their backward and recompute the rest there, matmuls included. A kept layer of
Llama-2-7B saves about 1 GiB at rows of 8,192 tokens; whole-layer recompute saves only its input
but runs the layer's forward twice. A lean layer sits between: most of the memory saved for a
share of the forward (README, "Lean layers").

torch does the planning (its activation memory budget: a knapsack over the joint graph's
recomputable nodes, by their size and estimated runtime); this module picks the budget and keeps
what must not be recomputed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

LEAN_BUDGET = 0.5
"""torch's activation memory budget for lean layers: the share, between the least a compiled layer
can save (its inputs) and what it saves by default, that the partitioner may keep, recomputing the
cheapest-to-recompute rest in the backward. The choice is a knapsack's, so it moves in steps:
Llama-2-7B, the shipped job, one H200, 8 of 32 layers recomputed (the dropout masks saved),
0.5 and 0.7 saved 0.44 GiB a layer at 13,549 and 13,689 tokens/s, 0.8 and 0.9 saved 0.83 GiB at
15,849 and 15,963 (a kept layer: 1.03 GiB); 0.6, 0.4 and 0.25 saved the same as each other with
nothing recomputed (bench/results/2026-11-29-session15-h200/, calls A and C). The low step, for
the plan: most of the memory saved."""


def lean_inductor(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
    """inductor with LEAN_BUDGET: a backend of its own, so dynamo compiles lean layers apart from
    the others (its cache entries are per backend). The partition happens here, at compile time, and
    the compile cache's key holds these settings. LoRA dropout's masks must be the forward's in the
    backward: on CUDA torch's RNG functionalization replays them from the saved Philox seed and
    offset (nothing saved; call-d of bench/results/2026-11-29-session15-h200/: 0.125 GiB a layer
    less than saving them, Llama-2-7B at rows of 8,192), elsewhere (the CPU, where torch has no
    such replay) KeepDropoutMasks saves them."""
    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    with torch._functorch.config.patch(activation_memory_budget=LEAN_BUDGET, functionalize_rng_ops=cuda), \
            torch._inductor.config.patch(joint_custom_pre_pass=None if cuda else KEEP_DROPOUT_MASKS):
        return compile_fx(graph, example_inputs)


class KeepDropoutMasks(CustomGraphPass):
    """Marks LoRA dropout's masks (the comparison of aten.rand's output with p) as saved for the
    backward. Under an activation memory budget below 1, torch's partitioner may recompute any
    op it bans by default, and it does not count aten.rand (what dropout decomposes to) as random:
    the backward would draw new masks, and the gradient would be wrong (tests/test_loop.py catches
    it). A mask is one byte a value (and not priced by qlora/estimate.py, which is for CUDA)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.rand.default:
                for user in node.users:
                    user.meta["recompute"] = CheckpointPolicy.MUST_SAVE

    def uuid(self) -> str:  # the compile cache's key: change it when the pass changes
        return "qlora-keep-dropout-masks-1"


KEEP_DROPOUT_MASKS = KeepDropoutMasks()
