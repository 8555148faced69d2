"""Variable-length attention: `model.attn_implementation: varlen`.

Packed rows hold several examples back to back. SDPA needs a dense [T, T] mask for them and computes
every block of it, masked or not; flash attention's variable-length kernel (torch's `varlen_attn`)
takes the examples' boundaries instead and computes only the causal triangle of each example. The
boundaries come with the batch (`sequence_bounds`, computed on the CPU: no sync per layer) and reach
this function through transformers' attention interface as `cu_seq_lens_q` / `max_length_q`.

Right-padded (unpacked) rows work too: each row is one sequence, and under a causal mask no real
token sees the padding after it. Left padding (generation) does not: evaluation loads the model
with SDPA.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface

VARLEN = "varlen"
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
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             scaling: float | None = None, dropout: float = 0.0,
                             cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q, k, v as [B, H, T, D]; returns [B, T, H, D]. A layer's
    `sliding_window` (Mistral-v0.1, Gemma's local layers) limits each token to that many latest
    tokens, itself included; logit soft-capping (Gemma-2) has no flash kernel here, and the model
    phase refuses varlen for such a model before it loads (qlora/families.py)."""
    if cu_seq_lens_q is None:
        raise RuntimeError("varlen attention needs the batch's sequence bounds (qlora.attention.sequence_bounds)")
    if softcap is not None:
        raise RuntimeError("varlen attention has no logit soft-capping")
    rows, heads, width, dim = query.shape
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # fp32 norms (model.upcast_non_quantized) hand us fp32 q/k/v. Autocast runs SDPA in the
        # compute dtype; flash attention, a custom op autocast does not see, accepts only that dtype.
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    # [B, H, T, D] -> [B*T, H, D]: one stream of tokens, sequences delimited by cu_seq_lens_q
    q, k, v = (t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value))
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling, sliding_window)
    else:  # no flash kernel on the CPU: the same sequences, one causal SDPA call each
        out = torch.cat([_causal_sdpa(q[s:e], k[s:e], v[s:e], scaling, sliding_window)
                         for s, e in zip(cu_seq_lens_q[:-1].tolist(), cu_seq_lens_q[1:].tolist())])
    return out.view(rows, width, heads, dim), None


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                  scale: float | None, window: int | None) -> torch.Tensor:
    # torch 2.9 spelled causality `is_causal=True` and had no `scale` (its default, 1/sqrt(D), is
    # Llama's) nor windows; later releases spell causality as a window of (before, after) tokens.
    limited = window is not None and window < longest
    if "is_causal" in _VARLEN_ACCEPTS:
        if limited:
            raise RuntimeError("this torch's varlen_attn has no sliding window; use model.attn_implementation=sdpa")
        kwargs: dict[str, Any] = {"is_causal": True}
    else:
        kwargs = {"window_size": (window - 1 if limited else -1, 0)}
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


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                 window: int | None) -> torch.Tensor:
    """[n, H, D] in and out."""
    n = q.shape[0]
    mask = None
    if window is not None and window < n:
        i = torch.arange(n, device=q.device)
        distance = i[:, None] - i[None, :]
        mask = (distance >= 0) & (distance < window)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         is_causal=mask is None, scale=scale, enable_gqa=bool(k.shape[1] != q.shape[1]))
    return out.transpose(0, 1)


def register() -> None:
    """Make `attn_implementation="varlen"` known to from_pretrained. transformers then builds no
    attention mask for it (none is needed: the bounds say everything)."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)
