"""Sharded QLoRA (`model.shard=true`): PyTorch FSDP splits the 4-bit base over torchrun's ranks, so
that each GPU holds 1/N of it and gathers one decoder layer at a time; the LoRA adapters (and
their optimizer state) stay whole on every rank, as under DDP.

    torchrun --nproc-per-node 4 train.py --config C model.shard=true

FSDP1 (`FullyShardedDataParallel`) is the path bitsandbytes and peft support: the Params4bit store
their packed NF4 bytes as bf16 (`bnb_4bit_quant_storage`, qlora/model.py), so that FSDP flattens them
with a layer's bf16 norms into one flat parameter. (FSDP2's `fully_shard` loses Params4bit's
quant_state: bitsandbytes issues 1424 and 1945.) The adapters are left out of FSDP (`ignored_states`):
fp32 beside the bf16 base, they could only be units of their own, and a unit nested in a decoder
layer is a graph break that leaves a compiled layer eager. Whole, they are 1 GB with AdamW's state
at 70B (r=16), their checkpoints need no gather, and bitsandbytes' 8-bit optimizers work on them.
The step is the one DDP takes: every rank's loss is its share of the whole step's, and the
adapters' gradients are summed over the ranks after the last backward
(qlora/distributed.py, `sum_adapter_gradients`).
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from qlora.model import decoder_layers

WRAPPED = "_fsdp_wrapped_module."
"""What FSDP puts into the names of the modules it wraps."""


def shard(model: torch.nn.Module, device: torch.device) -> FSDP:
    """FSDP units for every decoder layer and one for the rest (embeddings, final norm, head); each
    rank keeps 1/N of each unit's flat parameter and gathers a unit only for its forward and
    backward (memory: one layer's full weights at a time, two with the next one's gather in
    flight). The adapters move to `device` whole. `use_orig_params=True` is what torch.compile
    traces through (with False, dynamo runs every FSDP-managed module eagerly, compiled layers too)."""
    adapters = [p for p in model.parameters() if p.requires_grad]
    for p in adapters:  # FSDP moves only what it shards (a sharded model loads on the CPU)
        p.data = p.data.to(device)
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = ShardedLinear4bit
    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(layer) for layer in decoder_layers(model)}),
                ignored_states=adapters, sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=device,
                use_orig_params=True, limit_all_gathers=True)


class ShardedLinear4bit(bnb.nn.Linear4bit):
    """Linear4bit whose forward reads the NF4 quantization state from the module. Inside a gathered
    FSDP unit the weight is a plain view into the flat parameter, not a Params4bit: bitsandbytes'
    own forward then builds a new Params4bit for it at every call (Python work per Linear per
    micro-batch, and a graph break that leaves compiled layers eager)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=bias,
                               quant_state=self.quant_state).to(x.dtype)

