"""Sharded QLoRA (`model.shard=true`): PyTorch FSDP splits the 4-bit base and the LoRA adapters over
torchrun's ranks, so that each GPU holds 1/N of the weights and gathers one decoder layer at a time.

    torchrun --nproc-per-node 4 train.py --config C model.shard=true train.optimizer=adamw

FSDP1 (`FullyShardedDataParallel`) is the path bitsandbytes and peft support: the Params4bit store
their packed NF4 bytes as bf16 (`bnb_4bit_quant_storage`, qlora/model.py), so that FSDP flattens them
with a layer's bf16 norms into one flat parameter; peft's wrap policy gives each adapter matrix a
unit of its own, since one flat parameter cannot mix frozen and trained weights. (FSDP2's
`fully_shard` loses Params4bit's quant_state: bitsandbytes issues 1424 and 1945.)

The step is the one DDP takes: every rank's loss is its share of the whole step's, so the gradients
are reduce-scattered as a sum (`sum_shards`), not as FSDP's mean. Checkpoints gather the adapters
and their optimizer state to full tensors in the layout of an unsharded run, so a sharded run
resumes without sharding and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

WRAPPED = "_fsdp_wrapped_module."
"""What FSDP puts into the names of the modules it wraps."""
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13


def shard(model: torch.nn.Module, device: torch.device) -> FSDP:
    """FSDP units for every decoder layer (`_no_split_modules`) and every adapter matrix; each rank
    keeps 1/N of each unit's flat parameter and gathers a unit only for its forward and backward
    (memory: one layer's full weights at a time, two with the next one's gather in flight)."""
    sharded = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                   device_id=device, use_orig_params=False, limit_all_gathers=True)
    sharded.register_comm_hook(None, sum_shards)
    return sharded


def sum_shards(state: Any, grad: torch.Tensor, output: torch.Tensor) -> None:
    """FSDP's reduce-scatter of a unit's flat gradient into this rank's shard, without its division
    by the world size (as distributed.sum_gradients is for DDP)."""
    _reduce_scatter(output, grad)


def full_adapter(model: FSDP) -> dict[str, torch.Tensor]:
    """The trainable weights as full CPU tensors by their names in the unwrapped PEFT model, in its
    parameter order. A collective: every rank calls it. Only the adapters' units are gathered (never
    the 4-bit base)."""
    weights = {}
    for name, unit in model.named_modules():
        if not isinstance(unit, FSDP) or not any(p.requires_grad for p in unit.module.parameters(recurse=False)):
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for key, p in unit.module.named_parameters(prefix=name):
                weights[key.replace(WRAPPED, "")] = p.detach().cpu().clone()
    return weights


def full_optimizer_state(model: FSDP, optimizer: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """The optimizer's state gathered to full CPU tensors on rank 0 (a collective; the other ranks
    get {}), keyed as torch.optim keys an unsharded run's: by the index of each trainable parameter
    in `names` (full_adapter's order)."""
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
    if not by_name:
        return {}
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_optimizer_state(model: FSDP, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         names: list[str]) -> None:
    """An unsharded run's optimizer state_dict (or full_optimizer_state's) into the sharded optimizer."""
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
