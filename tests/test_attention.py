"""Flex attention's GPU path (qlora/attention.py), run on the CPU where it can run: the block masks
it builds from a batch's sequence bounds, and its forward through torch's own (uncompiled) flex
attention against one eager attention call per sequence. The CPU has no flex backward: training
there runs the per-sequence path, which tests/test_families.py checks against transformers' eager
attention, gradients included."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from qlora.attention import build_block_mask, causal_attention, flex_stream, padded_length


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
        out = flex_stream(q, k, v, cu, longest, 0.2, window, cap, flex=flex_attention, shortest=128)
        expected = torch.cat([causal_attention(q[s:e], k[s:e], v[s:e], 0.2, window, cap)
                              for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_streams_are_padded_to_one_length_up_to_8192_tokens():
    """One compiled flex kernel for every micro-batch of the shipped configs (rows of up to 4 x 2,048
    tokens), a power of two beyond."""
    assert [padded_length(n) for n in (1, 129, 4000, 8192, 8193, 20000)] == [8192] * 4 + [16384, 32768]
    assert [padded_length(n, shortest=128) for n in (1, 128, 129, 1000)] == [128, 128, 256, 1024]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex's compiled kernels need a GPU")
@pytest.mark.parametrize(("dtype", "dim", "tolerance"), [(torch.float32, 16, 1e-4), (torch.bfloat16, 256, 2e-2)])
def test_compiled_flex_keeps_the_output_and_gradients_on_the_gpu(dtype, dim, tolerance):
    """The compiled kernels, forward and backward, against fp32 eager attention per sequence: Gemma-2's
    shape in bf16 (head size 256, 16 query heads over 8 key/value heads, its soft-cap), and a small one
    in fp32. Skipped in CI (no GPU)."""
    generator = torch.Generator().manual_seed(dim)
    n, heads = 1000, (16, 8, 8) if dim == 256 else (4, 2, 2)
    inputs = [torch.randn(n, h, dim, generator=generator).cuda() for h in heads]
    cu = torch.tensor([0, 300, 301, 700, n], dtype=torch.int32, device="cuda")
    grad_out = torch.randn(n, heads[0], dim, generator=generator).cuda()

    def run(attention, cast):
        q, k, v = (t.to(cast).requires_grad_() for t in inputs)
        out = attention(q, k, v)
        out.backward(grad_out.to(cast))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    flex = run(lambda q, k, v: flex_stream(q, k, v, cu, 400, dim ** -0.5, None, 50.0), dtype)  # padded to 8,192
    eager = run(lambda q, k, v: torch.cat([causal_attention(q[s:e], k[s:e], v[s:e], dim ** -0.5, None, 50.0)
                                           for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]), torch.float32)
    for ours, expected in zip(flex, eager):
        torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
