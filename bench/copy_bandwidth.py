"""Host<->GPU copy bandwidth through pinned memory, alone and beside matmuls on the compute stream,
and what allocating pinned memory costs: the numbers activation offloading (model.offload_layers)
lives on.

    python bench/copy_bandwidth.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

GIB = 1 << 30


def timed(f: Callable[[], object], reps: int = 5) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    gpu = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    host = torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    print(f"GPU -> pinned host: {GIB / timed(lambda: host.copy_(gpu, non_blocking=True)) / 1e9:.1f} GB/s")
    print(f"pinned host -> GPU: {GIB / timed(lambda: gpu.copy_(host, non_blocking=True)) / 1e9:.1f} GB/s")
    timed(lambda: [a @ a for _ in range(20)])  # warm-up
    alone = timed(lambda: [a @ a for _ in range(20)])

    def both() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(gpu, non_blocking=True)
        for _ in range(20):
            a @ a
        torch.cuda.current_stream().wait_stream(side)

    print(f"20 matmuls of 8192^2 bf16: {alone * 1e3:.1f} ms alone, {timed(both) * 1e3:.1f} ms beside a 1 GiB copy out")
    t = time.perf_counter()
    torch.empty(GIB, dtype=torch.uint8, pin_memory=True)
    print(f"allocating 1 GiB of pinned host memory: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
