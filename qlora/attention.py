"""Attention over each example's own tokens: `model.attn_implementation: varlen` or `flex`.

Packed rows hold several examples back to back. SDPA needs a dense [T, T] mask for them and computes
every block of it, masked or not; both kernels here take the examples' boundaries instead and compute
only each example's causal triangle. The boundaries come with the batch (`sequence_bounds`, computed
on the CPU: no sync per layer) and reach these functions through transformers' attention interface
as `cu_seq_lens_q` / `max_length_q`.

- varlen: flash attention's variable-length kernel (torch's `varlen_attn`). No logit soft-capping.
- flex: torch's flex attention, compiled on its own: the logit soft-cap of Gemma-2 is a score
  modifier, the boundaries a block mask. For models whose attention flash cannot compute.

Right-padded (unpacked) rows work too: each row is one sequence, and under a causal mask no real
token sees the padding after it. Left padding (generation) does not: evaluation loads the model
with SDPA (eager where the model rules SDPA out: Gemma-2), the same function over a dense mask.
The CPU has neither kernel (flex has no backward there): it runs the same sequences one at a time,
with SDPA or, soft-capped, eagerly.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface

VARLEN = "varlen"
FLEX = "flex"
BOUNDED = (VARLEN, FLEX)
"""The implementations that read the batch's sequence bounds."""
BLOCK = 128
"""Flex's block of queries and keys (its default)."""
SMALL_BACKWARD = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 32,
                  "bwd_num_stages": 2, "bwd_num_warps": 4}
"""Flex's backward blocks where its default ones do not fit (flex_kernel_options)."""
_VARLEN_ACCEPTS = frozenset(inspect.signature(varlen_attn).parameters)  # read once, outside any compiled code


def sequence_bounds(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Cumulative start offsets of the sequences of a batch flattened to one stream of tokens, and
    the longest sequence. A sequence starts at every position 0 (packed rows restart their
    positions per example) and at the start of every row."""
    rows, width = batch["input_ids"].shape
    positions = batch.get("position_ids", torch.arange(width).expand(rows, width))
    starts = (positions.flatten() == 0).nonzero().squeeze(1)
    cu = torch.cat([starts, torch.tensor([rows * width])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "stream_capacity": batch.get("stream_capacity")}


def bounded_attention(kernel: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, None]]:
    """transformers' attention signature around `kernel(q, k, v, cu, longest, scale, window, softcap,
    capacity)`, which takes one stream of tokens [N, H, D] (H: query heads; K and V may have fewer)
    and a window only where it is shorter than the longest sequence. Each kernel reads what it
    needs: flash the longest sequence, flex the capacity."""

    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                sliding_window: int | None = None, softcap: float | None = None,
                stream_capacity: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """q, k, v as [B, H, T, D]; returns [B, T, H, D]. A layer's `sliding_window` (Mistral-v0.1,
        Gemma's local layers) limits each token to that many latest tokens, itself included.
        `stream_capacity`: the most tokens a micro-batch of this run holds (sequence_bounds)."""
        if cu_seq_lens_q is None:
            raise RuntimeError("this attention needs the batch's sequence bounds (qlora.attention.sequence_bounds)")
        window = sliding_window if sliding_window is not None and sliding_window < max_length_q else None
        rows, heads, width, dim = query.shape
        if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
            # fp32 norms (model.upcast_non_quantized) hand us fp32 q/k/v. Autocast runs SDPA in the
            # compute dtype; these kernels, which autocast does not see, would run in fp32 or refuse it.
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        # [B, H, T, D] -> [B*T, H, D]: one stream of tokens, sequences delimited by cu_seq_lens_q
        q, k, v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value))
        if q.is_cuda:
            out = kernel(q, k, v, cu_seq_lens_q, max_length_q, scaling, window, softcap, stream_capacity)
        else:  # no kernel on the CPU (flex: no backward there)
            out = per_sequence(q, k, v, cu_seq_lens_q, scaling, window, softcap)
        return out.view(rows, width, heads, dim), None

    return forward


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                 scale: float | None, window: int | None, softcap: float | None,
                 capacity: int | None = None) -> torch.Tensor:
    if softcap is not None:  # the model phase refuses varlen for such a model before it loads (qlora/families.py)
        raise RuntimeError("varlen attention has no logit soft-capping")
    # torch 2.9 spelled causality `is_causal=True` and had no `scale` (its default, 1/sqrt(D), is
    # Llama's) nor windows; later releases spell causality as a window of (before, after) tokens.
    if "is_causal" in _VARLEN_ACCEPTS:
        if window is not None:
            raise RuntimeError("this torch's varlen_attn has no sliding window; use model.attn_implementation=sdpa")
        kwargs: dict[str, Any] = {"is_causal": True}
    else:
        kwargs = {"window_size": (window - 1 if window is not None else -1, 0)}
    if "scale" in _VARLEN_ACCEPTS:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale * q.shape[-1] ** 0.5 - 1) > 1e-6:
        raise RuntimeError("this torch's varlen_attn has no `scale`; the model's attention scale is not 1/sqrt(D)")
    if k.shape[1] != q.shape[1] and "enable_gqa" in _VARLEN_ACCEPTS:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:  # torch 2.11's varlen_attn takes no grouped heads: repeat K and V
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


@functools.cache
def compiled_flex() -> Callable[..., torch.Tensor]:
    """flex_attention compiled for fixed shapes (padded_length makes them few). Built on first use:
    torch.compile at import would add a second to every command."""
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable  # a graph break in a compiled decoder layer: flex is compiled on its own, shapes fixed
def flex_stream(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                scale: float | None, window: int | None, softcap: float | None, capacity: int | None = None,
                flex: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Flex attention over one stream [N, H, D], zero-padded to `padded_length(N, capacity)` so that
    one compiled kernel serves every micro-batch of a run; the padding is sliced off. `flex`: the
    compiled function by default; tests pass the uncompiled one (the CPU has no compiled backward)."""
    n = q.shape[0]
    size = padded_length(n, capacity)
    mask = block_mask(cu, size, window)
    options = flex_kernel_options(q.shape[-1], shared_memory(q.device)) if flex is None else None
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, size - n)).transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = (flex or compiled_flex())(q, k, v, score_mod=soft_cap(softcap), block_mask=mask, scale=scale,
                                    enable_gqa=k.shape[1] != q.shape[1], kernel_options=options)
    return out[0].transpose(0, 1)[:n]


def flex_kernel_options(head_dim: int, shared_memory_per_block: int) -> dict[str, int] | None:
    """None (flex's own choice), or SMALL_BACKWARD where its default backward blocks for head sizes
    above 128 (Gemma-2's 256) need more shared memory than the GPU gives a block: 112 KiB, against
    99 KiB on the RTX 3090/4090/5080 class (sm_86/89/120), where that backward then fails to compile
    (pytorch/pytorch#198224, whose sweep found 32 x 32 blocks in 2 stages the fastest that fit on
    sm_121). The H100/H200 give 227 KiB: measured with flex's own choice, and with SMALL_BACKWARD
    forced (tests/test_attention.py), not on such a card."""
    return SMALL_BACKWARD if head_dim > 128 and shared_memory_per_block < 112 * 1024 else None


@functools.cache
def shared_memory(device: torch.device) -> int:
    """The most shared memory a kernel's block may opt into on this GPU, in bytes."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def padded_length(n: int, capacity: int | None) -> int:
    """The run's micro-batch capacity in whole blocks: one kernel compiled a run (a new length costs
    seconds of compiling, H200), and no more memory than the estimate prices, which counts every
    micro-batch at that capacity. Longer (or with no capacity known): the next power of two. Each
    padding token attends to itself only, so the kernel reads one block per BLOCK of them."""
    if capacity is not None and n <= capacity:
        return -(-capacity // BLOCK) * BLOCK
    return max(BLOCK, 1 << (n - 1).bit_length())


@functools.cache
def soft_cap(cap: float | None) -> Callable[..., torch.Tensor] | None:
    """Gemma-2's cap * tanh(score / cap). One function per cap: compiled flex recompiles for a new one."""
    if cap is None:
        return None

    def capped(score: torch.Tensor, b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
        return cap * torch.tanh(score / cap)

    return capped


_masks: dict[str, Any] = {"cu": None, "by_window": {}}
"""The block masks of the batch being run. Every layer and every recompute of one micro-batch gets
the same `cu` tensor (the forward's own argument), so they are built once per micro-batch (a few
ms on the GPU), one per window size."""


def block_mask(cu: torch.Tensor, size: int, window: int | None) -> BlockMask:
    same = _masks["cu"] is not None and _masks["cu"]() is cu  # a weak reference: a freed batch never matches
    if not same:
        _masks["cu"], _masks["by_window"] = weakref.ref(cu), {}
    key = (size, window)
    if key not in _masks["by_window"]:
        _masks["by_window"][key] = build_block_mask(cu, size, window)
    return _masks["by_window"][key]


def build_block_mask(cu: torch.Tensor, size: int, window: int | None) -> BlockMask:
    """Causal within each sequence (and within the window): token i's sequence is the number of
    sequence ends at or before i; each padding token past cu[-1] is a sequence of its own.

    The kernel needs, per block of 128 queries, the key blocks it must read: "full" ones (every
    pair allowed) and partial ones (the kernel applies `allowed` there). create_block_mask finds
    them by evaluating `allowed` densely, with [size, size] int64 temporaries (0.5 GB at 8,192
    tokens, which would stay in the GPU allocator's reserve); sequences being contiguous ranges,
    block bounds give the same answer from [blocks, blocks] tensors (tests/test_attention.py)."""
    positions = torch.arange(size, device=cu.device)
    sequence = (torch.searchsorted(cu[1:].to(positions.dtype), positions, right=True)
                + (positions - cu[-1]).clamp(min=0))  # ids only grow: blocks hold ranges of them

    def allowed(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        keep = (sequence[q] == sequence[kv]) & (q >= kv)
        return keep if window is None else keep & (q - kv < window)

    ends = sequence.view(-1, BLOCK)[:, [0, -1]]  # first and last sequence of each block
    q_first, q_last = ends[:, None, 0], ends[:, None, 1]
    kv_first, kv_last = ends[None, :, 0], ends[None, :, 1]
    q_block = torch.arange(ends.shape[0], device=cu.device)[:, None]
    kv_block = q_block.T
    # a key block at or before the query block, reaching its first sequence
    some = (kv_block <= q_block) & (kv_last >= q_first)
    full = (kv_block < q_block) & (kv_first == q_last)  # both blocks inside one sequence
    if window is not None:  # nearest and farthest pairs of the two blocks
        some &= (q_block - kv_block) * BLOCK - (BLOCK - 1) < window
        full &= (q_block - kv_block) * BLOCK + (BLOCK - 1) < window
    partial = some & ~full
    return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(full), BLOCK_SIZE=BLOCK, mask_mod=allowed,
                                    seq_lengths=(size, size))


def kv_blocks(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[q blocks, kv blocks] bool -> BlockMask's (count, indices) per query block, chosen ones first."""
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)
    return chosen.sum(1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None,
                 window: int | None, softcap: float | None) -> torch.Tensor:
    """The kernels' result computed one sequence at a time: the CPU's path, and the tests' reference."""
    return torch.cat([causal_attention(q[s:e], k[s:e], v[s:e], scale, window, softcap)
                      for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                     window: int | None, softcap: float | None) -> torch.Tensor:
    """One sequence, [n, H, D] in and out: SDPA, or with a soft-cap the eager computation
    transformers' Gemma-2 runs (scores, cap, mask, fp32 softmax)."""
    n = q.shape[0]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    mask = None
    if window is not None and window < n:
        i = torch.arange(n, device=q.device)
        distance = i[:, None] - i[None, :]
        mask = (distance >= 0) & (distance < window)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                             enable_gqa=bool(k.shape[0] != q.shape[0]))
        return out.transpose(0, 1)
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    scores = q @ k.transpose(1, 2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = soft_cap(softcap)(scores, None, None, None, None)
    if mask is None:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v).transpose(0, 1)


def register() -> None:
    """Make "varlen" and "flex" known to from_pretrained. transformers then builds no attention mask
    for them (none is needed: the bounds say everything)."""
    AttentionInterface.register(VARLEN, bounded_attention(flash_varlen))
    AttentionInterface.register(FLEX, bounded_attention(flex_stream))
