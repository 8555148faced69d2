"""Where the memory goes, measured: per-phase peaks each step, a start-up breakdown, a snapshot for
pytorch.org/memory_viz. (The prediction made before anything loads is qlora/estimate.py.)

On CUDA the numbers come from the caching allocator (`torch.cuda.memory_stats`), which counts an
allocation when the kernel using it is queued: reading it needs no device sync. On CPU only the
process RSS is known; the CUDA fields are None.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from qlora.errors import UserError


GIB = 1024 ** 3
PHASES = ("forward", "backward", "optimizer")


def _proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its high-water mark) from the same kernel counters, so the
    peak is never below the current value."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _rss_bytes() -> int:
    return _proc_status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    return _proc_status_bytes("VmHWM")


class MemoryMeter:
    """Peak allocated memory per phase of the current step. `phase` resets the allocator's peak
    counters on entry and keeps the largest peak seen on exit, so forward, backward and optimizer
    peaks are told apart even though micro-batches interleave forward and backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._peaks: dict[str, int] = {}
        self._active_peak = self._reserved_peak = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.cuda:
            stats = torch.cuda.memory_stats(self.device)
            self._peaks[name] = max(self._peaks.get(name, 0), stats["allocated_bytes.all.peak"])
            self._active_peak = max(self._active_peak, stats["active_bytes.all.peak"])
            self._reserved_peak = max(self._reserved_peak, stats["reserved_bytes.all.peak"])

    def step_record(self) -> dict[str, Any]:
        """The `mem` object of one metrics line; starts the next step's peaks from zero."""
        record: dict[str, Any] = {"rss_gib": _rss_bytes() / GIB, "peak_rss_gib": _peak_rss_bytes() / GIB}
        if self.cuda:
            stats = torch.cuda.memory_stats(self.device)
            record.update({
                "allocated_gib": stats["allocated_bytes.all.current"] / GIB,
                "reserved_gib": stats["reserved_bytes.all.current"] / GIB,
                **{f"peak_{p}_gib": self._peaks.get(p, 0) / GIB for p in PHASES},
                "peak_active_gib": self._active_peak / GIB,
                "peak_reserved_gib": self._reserved_peak / GIB,
                "alloc_retries": stats.get("num_alloc_retries", 0),
                "ooms": stats.get("num_ooms", 0)})
        else:
            record.update({"allocated_gib": None, "reserved_gib": None,
                           **{f"peak_{p}_gib": None for p in PHASES},
                           "peak_active_gib": None, "peak_reserved_gib": None, "alloc_retries": None,
                           "ooms": None})
        self._peaks, self._active_peak, self._reserved_peak = {}, 0, 0
        return record


def step_peak_gib(mem: dict[str, Any]) -> float | None:
    """The largest per-phase peak of one step's `mem` record (None on CPU)."""
    return None if mem["peak_forward_gib"] is None else max(mem[f"peak_{p}_gib"] for p in PHASES)


def memory_line(device: torch.device) -> str:
    """One line of where memory stands now (for error messages)."""
    if device.type != "cuda":
        return f"process RSS {_rss_bytes() / GIB:.2f} GiB (peak {_peak_rss_bytes() / GIB:.2f})"
    stats = torch.cuda.memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    gib = lambda key: stats.get(key, 0) / GIB  # noqa: E731
    return (f"allocated {gib('allocated_bytes.all.current'):.2f} GiB (peak {gib('allocated_bytes.all.peak'):.2f}), "
            f"reserved {gib('reserved_bytes.all.current'):.2f} GiB, device {(total - free) / GIB:.2f} of "
            f"{total / GIB:.2f} GiB in use, {stats.get('num_alloc_retries', 0)} allocation retries")


# ---------------------------------------------------------------- start-up breakdown

def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: views of one storage count it once, and a
    view whose storage was freed counts nothing (a sharded rank's 4-bit weights are views into its
    shard of each layer's flat weight, or into the freed gathered one)."""
    storages = {}
    for t in tensors:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def is_paged(t: torch.Tensor) -> bool:
    """bitsandbytes marks its paged (CUDA unified memory) buffers with `is_paged`."""
    return bool(getattr(t, "is_paged", False))


def startup_breakdown(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      device: torch.device) -> dict[str, Any]:
    """Bytes by owner, measured after the first optimizer step (when optimizer states exist).
    On CUDA the rows add up to what the device has in use:
    base + adapters + optimizer (device part) + other allocations + reserved gap + CUDA context."""
    params = list(model.parameters())
    adapters = [p for p in params if p.requires_grad]
    adapter_ids = {id(p) for p in adapters}
    base = [p for p in params if id(p) not in adapter_ids] + list(model.buffers())
    # 4-bit weights keep their quantization constants (absmax, double-quant codebook) outside the
    # parameter: count them with the base weights
    quant_consts = [t for m in model.modules() for t in _quant_state_tensors(m)]
    states = optimizer_state_tensors(optimizer)
    rows = {"base_weights": tensor_bytes(iter(base)) + tensor_bytes(iter(quant_consts)),
            "lora_adapters": tensor_bytes(iter(adapters)),
            "optimizer_state_device": tensor_bytes(t for t in states if not is_paged(t)),
            "optimizer_state_paged": tensor_bytes(t for t in states if is_paged(t))}
    out: dict[str, Any] = {"device": str(device), "bytes": rows}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        allocated, reserved = stats["allocated_bytes.all.current"], stats["reserved_bytes.all.current"]
        known = rows["base_weights"] + rows["lora_adapters"] + rows["optimizer_state_device"]
        rows["other_allocated"] = allocated - known  # gradients freed by zero_grad, buffers, workspaces
        rows["reserved_unallocated"] = reserved - allocated  # the caching allocator's gap
        rows["cuda_context_and_other"] = (total - free) - reserved  # CUDA context, cuBLAS, NCCL...
        out.update({"device_total": total, "device_in_use": total - free})
    else:
        out["rss"] = _rss_bytes()
    return out


def _quant_state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return []
    found = [state.absmax, getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        found += [nested.absmax, nested.code]
    return [t for t in found if isinstance(t, torch.Tensor)]


def format_breakdown(breakdown: dict[str, Any]) -> str:
    lines = [f"memory after the first step on {breakdown['device']}:"]
    lines += [f"  {name:<26} {size(value)}" for name, value in breakdown["bytes"].items()]
    if "device_in_use" in breakdown:
        lines.append(f"  {'= device in use':<26} {size(breakdown['device_in_use'])}"
                     f" of {size(breakdown['device_total'])}")
    else:
        lines.append(f"  {'process RSS':<26} {size(breakdown['rss'])}")
    return "\n".join(lines)


def size(n: int) -> str:
    return f"{n / GIB:9.3f} GiB" if abs(n) >= GIB else f"{n / 2**20:9.3f} MiB"


def write_breakdown(breakdown: dict[str, Any], run_dir: Path) -> None:
    (run_dir / "memory.json").write_text(json.dumps(breakdown, indent=1))


# ---------------------------------------------------------------- snapshots for memory_viz

def start_history(steps: int, device: torch.device) -> bool:
    """Record every allocation with its stack for the first `steps` steps (costly; off when 0)."""
    if steps <= 0 or device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    return True


def dump_history(path: Path) -> None:
    """Write the snapshot (a pickle that pytorch.org/memory_viz opens) and stop recording."""
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


def cap_memory(device: torch.device, gib: float | None) -> None:
    """Make `gib` GiB the most this process's caching allocator may hold on `device` (None: no cap);
    set before the model loads. Refused off CUDA, where there is nothing to cap."""
    if gib is None:
        return
    if device.type != "cuda":
        raise UserError(f"train.memory_cap_gib={gib:g} caps CUDA memory; this run is on the {device.type}")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
