"""Many processes, one run: data parallelism on torch.distributed and DistributedDataParallel.

    torchrun --nproc-per-node 4 train.py --config C       # NCCL on GPUs, gloo on CPUs

Every rank loads the 4-bit model on its own device (cuda:LOCAL_RANK) and trains a copy of the
LoRA adapters; DDP sums the adapters' gradients across ranks. An optimizer step is the config's, whatever
the world size: every rank collates the step's micro-batches from the same deterministic data
order, takes its share of them (`share`), and divides its summed loss by the supervised tokens of
the *whole* step; DDP then sums the ranks' gradients (`sum_gradients`, instead of its default
mean). So 1, 2 or 4 processes compute the same gradient, up to the order of floating-point sums.

Global rank 0 owns the run's files and the printed output; every rank's errors reach stderr.
One process without torchrun is world size 1: no process group, no DDP, nothing changes.
With model.shard=true FSDP replaces DDP, each rank holding 1/N of the 4-bit base and the whole
adapters, whose gradients are summed after the step's last backward (qlora/shard.py).
"""

from __future__ import annotations

import atexit
import inspect
import os
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel

from qlora.data import IGNORE
from qlora.errors import UserError
from qlora.model import resolve_device
from qlora.shard import shard


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Global rank 0: writes the run's files and prints."""
        return self.rank == 0


def launched_ranks() -> int:
    """How many processes torchrun started (WORLD_SIZE; 1 without torchrun), known before the
    process group forms."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init(device_name: str) -> tuple[World, torch.device]:
    """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK) and this rank's device; joins
    the process group when there is more than one process. (Non-main ranks print nothing:
    qlora.quiet_other_ranks, called first by train.py and evaluate.py.)"""
    world = World(rank=int(os.environ.get("RANK", 0)), size=launched_ranks(),
                  local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    device = local_device(device_name)
    if world.size == 1:
        return world, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=_store(world), rank=world.rank,
                            world_size=world.size, device_id=device if device.type == "cuda" else None)
    atexit.register(finish, world)  # also after an early return or an error
    return world, device


def local_device(device_name: str) -> torch.device:
    """This process's device, known before the process group forms: under torchrun each rank takes
    cuda:LOCAL_RANK (and cuda:N is refused there)."""
    device = resolve_device(device_name)
    if launched_ranks() == 1:
        return device
    if device_name.startswith("cuda:"):
        raise UserError(f"train.device={device_name} under torchrun: each rank takes cuda:LOCAL_RANK; "
                        f"use train.device=auto or cuda")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device.type == "cuda" else device


def _store(world: World) -> dist.Store | None:
    """torchrun's own key-value store, its keys prefixed by the restart count: the store outlives a
    restart (--max-restarts), and without the prefix gloo reads the dead workers' addresses from
    it and fails to connect. Without torchrun: None (env://)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, is_master=False)
    return dist.PrefixStore(f"qlora/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device, sharded: bool = False) -> torch.nn.Module:
    """DDP over the trainable (LoRA) weights when there are several ranks, or FSDP over the 4-bit
    base with `sharded` (qlora/shard.py); the model itself on one process. Every rank builds the
    same model from the same seed, so nothing is broadcast at the start."""
    if sharded:
        return shard(model, device)
    if world.size == 1:
        return model
    # no buffer to keep in step (rotary tables are constants); torch 2.13 renamed the switch
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  init_sync=False, **{quiet: False})
    ddp.register_comm_hook(None, sum_gradients)
    return ddp


def sum_gradients(state, bucket):  # no hints: DDP checks them, and this module's are strings
    """DDP's all-reduce of a dist.GradBucket without its division by the world size: each rank's
    loss is already a share of the whole step's, so the step's gradient is the sum. (Scaling the
    loss by the world size instead would push fp16 gradients towards overflow.)"""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PEFT model inside DDP or FSDP (under FSDP its 4-bit base is this rank's shards)."""
    return model.module if isinstance(model, (DistributedDataParallel, FSDP)) else model


def sync_gradients(model: torch.nn.Module, last: bool) -> ContextManager[Any]:
    """Within an accumulation window DDP all-reduces only at the last micro-batch's backward."""
    return nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()


def sum_adapter_gradients(model: torch.nn.Module) -> None:
    """Under FSDP (model.shard) the adapters are whole on every rank, outside FSDP: all-reduce SUM
    of their gradients, once a step after the last backward (DDP did it during that backward;
    nothing to do on one process)."""
    if not isinstance(model, FSDP):
        return
    works = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters() if p.requires_grad]
    for work in works:
        work.wait()


def clip_grad_norm(params: Sequence[torch.Tensor], per_adapter: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of `params` (what the optimizer steps) to `max_norm` in total, the norm
    summed over `per_adapter` (the same gradients, one tensor an adapter: one flat tensor's norm
    would be summed in another order); returns the norm before (a sync point). After the ranks'
    sum the gradients are the same on every rank."""
    total = torch.nn.utils.get_total_norm(per_adapter)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def share(batches: list[dict[str, Any]], world: World, even: bool = False) -> list[dict[str, Any]]:
    """This rank's micro-batches of a step: whole micro-batches, longest first to the rank with the
    fewest tokens so far, in their original order. A rank left without one gets `idle_batch()`.
    `even` (sharded models): every rank runs as many as the busiest rank, padded with idle batches,
    since under FSDP every forward and backward gathers weights from all ranks, and a rank with
    fewer would leave the others waiting forever (DDP all-reduces once per step)."""
    if world.size == 1:
        return batches
    load, owner = [0] * world.size, {}
    for i in sorted(range(len(batches)), key=lambda i: (-batches[i]["n_tokens"], i)):
        rank = min(range(world.size), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + batches[i]["n_tokens"]
    mine = [b for i, b in enumerate(batches) if owner[i] == world.rank]
    runs = max(Counter(owner.values()).values()) if even else 1
    capacity = batches[0].get("stream_capacity") if batches else None
    return mine + [idle_batch(capacity) for _ in range(runs - len(mine))]


def split_hint(packing: bool, rows_multiple: int, world: World) -> str | None:
    """A line for rank 0 when packed rows will split unevenly: whole rows are the unit of `share`,
    and a step's few long rows rarely divide by the rank count (2 ranks, 32 examples a step: 0.93
    token balance, 1.00 with even rows; README, Many GPUs)."""
    if world.size == 1 or not packing or rows_multiple % world.size == 0:
        return None
    return (f"data: packed rows are split whole over {world.size} ranks and may load them unevenly; "
            f"data.pack_rows_multiple={world.size} (or a multiple of every rank count you use) evens the shares")


def idle_batch(stream_capacity: int | None = None) -> dict[str, Any]:
    """Two tokens with one label, weighted 0 by the loop: a rank with no rows (or, sharded, fewer
    than the others) still runs a forward and backward, joining the collectives with zeros. With the
    run's capacity, as its other batches carry it: flex attention pads to it, and a new value would
    compile anew (qlora/attention.py)."""
    return {"input_ids": torch.zeros((1, 2), dtype=torch.long), "labels": torch.tensor([[IGNORE, 0]]),
            "attention_mask": torch.ones((1, 2), dtype=torch.long), "n_tokens": 0, "n_supervised": 0,
            "weight": 0.0, "stream_capacity": stream_capacity}


def sum_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """All-reduce SUM (a sync point); the value itself on one process."""
    if world.size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True when `flag` is set on any rank (a sync point): ranks stop at the same step."""
    if world.size == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_to_main(value: Any, world: World) -> list[Any] | None:
    """Every rank's `value` on rank 0 (None elsewhere); [value] on one process."""
    if world.size == 1:
        return [value]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


SAME_FILES = "is train.output_dir one shared folder, and are the data and config the same on every machine?"


def check_same(world: World, what: str, value: Any, hint: str = SAME_FILES) -> None:
    """Refuse to go on when the ranks disagree on `value` (e.g. a rank that sees another
    checkpoint or other data: its gradients would be summed with the others' silently)."""
    values = [value] * world.size
    if world.size > 1:
        dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise UserError(f"the ranks do not agree on the {what}: rank {differ[0]} differs from rank 0 ({hint})")


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
