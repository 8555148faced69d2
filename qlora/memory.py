"""Memory readings: CUDA allocator statistics on a GPU, process RSS on a CPU."""

from __future__ import annotations

import resource

import torch

GIB = 1024 ** 3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_now(device: torch.device) -> dict[str, float | None]:
    """Current and peak memory in GiB. On CUDA the peak is since the last reset, and is reset here
    so that each call reports the peak of the step before it."""
    if device.type == "cuda":
        stats = {"allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                 "reserved_gib": torch.cuda.memory_reserved(device) / GIB,
                 "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                 "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
                 "rss_gib": _rss_bytes() / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    return {"allocated_gib": None, "reserved_gib": None, "peak_allocated_gib": None,
            "peak_reserved_gib": None, "rss_gib": _rss_bytes() / GIB,
            # ru_maxrss is in KiB on Linux and never resets: the process's peak so far
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
