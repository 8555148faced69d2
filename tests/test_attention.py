"""Flex attention's GPU path (qlora/attention.py), run on the CPU where it can run: the block masks
it builds from a batch's sequence bounds, and its forward through torch's own (uncompiled) flex
attention against one eager attention call per sequence. The CPU has no flex backward: training
there runs the per-sequence path, which tests/test_families.py checks against transformers' eager
attention, gradients included."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from qlora import attention
from qlora.attention import (SMALL_BACKWARD, bounded_attention, build_block_mask, flex_kernel_options, flex_stream,
                             padded_length, per_sequence)


def random_bounds(generator: torch.Generator, n: int) -> torch.Tensor:
    """Up to 7 sequences of random lengths, n tokens in all."""
    count = int(torch.randint(0, 8, (1,), generator=generator)) if n > 1 else 0
    cuts = torch.randint(1, max(n, 2), (count,), generator=generator)
    return torch.tensor([0, *sorted(set(cuts.tolist())), n], dtype=torch.int32)


def dense_block_mask(cu: torch.Tensor, size: int, window: int | None):
    """torch's create_block_mask, token by token: causal within a sequence and the window; a padding
    token (past cu[-1]) sees itself only."""
    sequence = torch.searchsorted(cu[1:].long(), torch.arange(size), right=True)
    real = torch.arange(size) < cu[-1]

    def allowed(b, h, q, kv):
        keep = real[q] & real[kv] & (sequence[q] == sequence[kv]) & (q >= kv)
        if window is not None:
            keep = keep & (q - kv < window)
        return keep | (q == kv)

    return create_block_mask(allowed, None, None, size, size, device="cpu")


def blocks(mask, count: str, indices: str) -> list[set[int]]:
    counts = getattr(mask, count)[0, 0].tolist()
    return [set(getattr(mask, indices)[0, 0, i, :c].tolist()) for i, c in enumerate(counts)]


@pytest.mark.parametrize("window", [None, 48, 129, 300])
def test_block_masks_from_bounds_are_torchs_own(window):
    """Which key blocks each query block reads, partly or fully, as create_block_mask finds them, for
    random sequence bounds, the padding past the last sequence, and windows inside and across blocks."""
    generator = torch.Generator().manual_seed(0 if window is None else window)
    for size in (128, 256, 1024, 2048):
        for _ in range(4):
            cu = random_bounds(generator, int(torch.randint(1, size + 1, (1,), generator=generator)))
            ours, torchs = build_block_mask(cu, size, window), dense_block_mask(cu, size, window)
            assert blocks(ours, "kv_num_blocks", "kv_indices") == blocks(torchs, "kv_num_blocks", "kv_indices")
            assert blocks(ours, "full_kv_num_blocks", "full_kv_indices") == \
                blocks(torchs, "full_kv_num_blocks", "full_kv_indices")
            assert torch.equal(ours.q_num_blocks, torchs.q_num_blocks)  # the backward's view, derived from these


@pytest.mark.parametrize(("n", "cuts", "window", "cap"), [
    (300, [100, 250], None, 50.0),  # Gemma-2's soft-cap
    (90, [40], None, 50.0),  # shorter than one block
    (300, [100, 250], 48, 50.0),  # a sliding window inside the sequences
    (513, [1, 200, 511], None, None),  # one-token sequences; padded to 1,024
    (1000, [500], 200, None)])
def test_flex_forward_is_eager_attention_per_sequence(n, cuts, window, cap):
    """Grouped heads (4 query heads, 2 key/value heads), the model's own scale."""
    generator = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, heads, 16, generator=generator) for heads in (4, 2, 2))
    cu = torch.tensor([0, *cuts, n], dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    with torch.no_grad():
        out = flex_stream(q, k, v, cu, longest, 0.2, window, cap, capacity=None, flex=flex_attention)
        expected = per_sequence(q, k, v, cu, 0.2, window, cap)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_new_batch_or_window_gets_its_own_block_mask():
    """The masks are built once per micro-batch and window, for every layer and recompute of it: a
    new batch of the same length, and another window of the same batch, must not reuse them."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(400, heads, 16, generator=generator) for heads in (4, 2, 2))
    first, second = (torch.tensor(cu, dtype=torch.int32) for cu in ([0, 100, 400], [0, 250, 300, 400]))
    with torch.no_grad():
        for cu, window in ((first, None), (second, None), (second, 60), (second, None), (first, 60)):
            out = flex_stream(q, k, v, cu, 300, 0.25, window, 50.0, capacity=512, flex=flex_attention)
            torch.testing.assert_close(out, per_sequence(q, k, v, cu, 0.25, window, 50.0), rtol=1e-5, atol=1e-5)


def test_streams_are_padded_to_the_runs_capacity():
    """One compiled flex kernel for every micro-batch of a run: the capacity its batches carry
    (qlora/batching.py) in whole blocks; beyond it, or unknown, a power of two."""
    assert [padded_length(n, 8192) for n in (1, 129, 4000, 8192)] == [8192] * 4
    assert [padded_length(n, 3000) for n in (1, 3000, 3001)] == [3072, 3072, 4096]
    assert [padded_length(n, None) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]


CAP = 2.0
"""A soft-cap that changes attention scores of about 1 (Gemma-2's 50 leaves them nearly as they are)."""


def test_small_backward_blocks_where_the_default_ones_do_not_fit():
    """Head sizes above 128 on a GPU with 99 KiB of shared memory a block (RTX 3090/4090/5080), not on
    an H100/H200 (227 KiB), nor at head size 128."""
    assert flex_kernel_options(256, 101376) == SMALL_BACKWARD
    assert flex_kernel_options(256, 232448) is None and flex_kernel_options(128, 101376) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex's compiled kernels need a GPU")
@pytest.mark.parametrize(("autocast", "dim", "window", "small_gpu", "tolerance"),
                         [(False, 16, None, False, 1e-4), (True, 256, None, False, 2e-2),
                          (True, 256, 200, False, 2e-2), (True, 256, None, True, 2e-2)])
def test_compiled_flex_keeps_the_output_and_gradients_on_the_gpu(autocast, dim, window, small_gpu, tolerance,
                                                                 monkeypatch):
    """The attention interface's flex function, compiled kernels forward and backward, against fp32
    attention per sequence: fp32 at head size 16; Gemma-2's heads (256 wide, 16 query over 8
    key/value) from fp32 inputs under bf16 autocast (fp32 norms hand flex fp32 q/k/v), with a
    soft-cap that changes the result (Gemma-2's 50 would not, at these scores), with a sliding window
    shorter than a sequence, and as on a GPU with 99 KiB of shared memory a block (the RTX 5080
    class: SMALL_BACKWARD). Skipped in CI (no GPU)."""
    if small_gpu:
        monkeypatch.setattr(attention, "shared_memory", lambda device: 99 * 1024)
    generator = torch.Generator().manual_seed(dim)
    n, heads = 1000, (16, 8, 8) if dim == 256 else (4, 2, 2)
    inputs = [torch.randn(1, h, n, dim, generator=generator).cuda() for h in heads]  # one packed row
    cu = torch.tensor([0, 300, 301, 700, n], dtype=torch.int32, device="cuda")
    grad_out = torch.randn(1, n, heads[0], dim, generator=generator).cuda()
    flex = bounded_attention(flex_stream)
    q, k, v = (t.clone().requires_grad_() for t in inputs)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out, _ = flex(None, q, k, v, None, scaling=dim ** -0.5, cu_seq_lens_q=cu, max_length_q=400,
                      sliding_window=window, softcap=CAP, stream_capacity=1024)
    out.backward(grad_out.to(out.dtype))
    q0, k0, v0 = (t.clone().requires_grad_() for t in inputs)
    streams = [t[0].transpose(0, 1) for t in (q0, k0, v0)]
    expected = per_sequence(*streams, cu, dim ** -0.5, window, CAP)
    uncapped = per_sequence(*(t.detach() for t in streams), cu, dim ** -0.5, window, None)
    assert (expected - uncapped).abs().max() > 5 * tolerance * expected.abs().max()  # the cap matters here
    expected.backward(grad_out[0])
    for ours, reference in ((out[0], expected), (q.grad, q0.grad), (k.grad, k0.grad), (v.grad, v0.grad)):
        torch.testing.assert_close(ours.float(), reference, rtol=tolerance, atol=tolerance * float(reference.abs().max()))
