"""Activation offloading (model.offload_layers): some of the layers that would recompute their
activations instead send what their forward saves for the backward to pinned host memory, and
bring it back, ahead of time, for their backward. No recompute, so the same numbers as a layer that
keeps its activations (the same dropout draws too); the cost is host<->GPU copies, which run on a
side CUDA stream while the GPU computes the layers in between.

How a step flows, for an offloaded layer j:
- forward: every tensor the layer's autograd graph saves passes through `pack` (torch's
  saved-tensor hooks); activations of at least MIN_BYTES are copied to the layer's pinned host
  arena on the copy stream (frozen weights, small tensors and tensors that are not one dense block
  stay where they are); the forward of layer j + RELEASE_AFTER frees their GPU memory;
- backward: when the backward reaches layer j + LEAD (or any layer in between), the hook on that
  layer's output starts copying layer j's tensors back (`prefetch`), so they are on the GPU when
  layer j's backward unpacks them.

Offloaded inputs (model.offload_inputs): a recomputing layer keeps only its input for the backward
(held by torch.utils.checkpoint), one [tokens, hidden] tensor a layer. Those inputs go to pinned host
memory too: copied out as the layer's forward starts, their GPU memory freed (the storage resized
to nothing, as FSDP frees its gathered weights) at the forward of layer j + INPUT_RELEASE_AFTER,
and put back into the same storage from the backward of layer j + LEAD on, before the recompute
reads it (the recomputed function waits for the copy, or makes it, if it was not started).

Every decoder layer runs through `ActivationOffload.call` (its GradientCheckpointingLayer's
`_gradient_checkpointing_func`), so the layers above an offloaded one can start its copies back.
Offloaded layers are at least LEAD + 1 apart, so one layer at a time comes back early, and never
the last layer (qlora/estimate.py prices both). One forward, then its backward: a second forward
through an offloaded layer before the first one's backward reuses its host memory, and the first
one's backward is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from qlora.errors import UserError

MIN_BYTES = 1 << 20
"""Smaller saved tensors (norm statistics, LoRA's rank-r intermediates) stay on the GPU: their copies
would cost more launches than the memory is worth."""
ALIGN = 512
"""Byte alignment of each host copy in its layer's arena (any dtype's, and the copy engines')."""
RELEASE_AFTER = 6
"""The forward of layer j + RELEASE_AFTER (or of the last layer) frees offloaded layer j's GPU
tensors: the compute stream waits there for their copies to the host, a GPU-side wait (Llama-2-7B,
rows of 8,192, one H200: 17 ms of copies, about four layers' forward; the copies start as layer j
ends, so five layers hide them with a layer's margin; not measured). Six is the plan's spacing
(plan.py, OFFLOAD_EVERY): each offloaded layer frees the one before it. Freeing them once the CPU
saw the copies done kept them through the backward's peak (0.57 GiB more than without offloading,
bench/results/2026-11-29-session12-h200/call-e): the CPU runs layers ahead of the GPU."""
INPUT_RELEASE_AFTER = 3
"""The forward of layer j + INPUT_RELEASE_AFTER (or of the last layer) frees recomputing layer j's
input (model.offload_inputs): a copy of 64-128 MiB (Llama-2-7B, rows of 8,192, bf16 or fp32) takes
1.2-2.4 ms at 54 GB/s, but may queue behind an offloaded layer's copies on the one copy stream, and
the compute stream then waits at the release. Not measured apart: with 4 offloaded layers the plan
with offloaded inputs ran 0.8% faster than without (bench/results/2026-11-29-session13-h200/call-d)."""
LEAD = 2
"""The backward of layer j + LEAD starts bringing layer j's tensors back: two layers' backward to
hide the copy in; offloaded layers LEAD + 1 apart or more have one layer back early at a time."""


@dataclass
class Offloaded:
    """One saved tensor of an offloaded layer: its host copy, and its GPU copy once prefetched."""
    layer: int
    host: torch.Tensor
    forward: int
    """Which forward of its layer wrote the host copy (arena memory is reused by the next one)."""
    back: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    """On CUDA: recorded on the copy stream after the copy into `back`."""


@dataclass
class OffloadedInput:
    """The input a recomputing layer's checkpoint keeps, while its GPU storage is freed."""
    layer: int
    tensor: torch.Tensor
    """The input itself: torch.utils.checkpoint holds it and recomputes from it."""
    host: torch.Tensor
    """Its storage's bytes, in the layer's arena."""
    forward: int
    done: torch.cuda.Event | None = None
    """On CUDA: recorded on the copy stream after the copy out."""
    ready: torch.cuda.Event | None = None
    """On CUDA: recorded on the copy stream after the copy back."""


def storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """t's storage, as a byte tensor of its own (copying into it leaves t's version counter alone)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def second_forward(layer: int, what: str) -> UserError:
    """A backward whose host copies a later forward through the same layer has overwritten."""
    return UserError(f"layer {layer} offloads its {what}, and ran a second forward before the first one's "
                     f"backward: one forward, then its backward")


def most_offloaded(recomputed: int, layers: int) -> int:
    """How many of the first `recomputed` layers (of `layers`) may offload: a third of those below
    the last layer (no layer above it would start its copies back), LEAD + 1 apart."""
    return min(recomputed, layers - 1) // (LEAD + 1)


def offloaded_layers(recomputed: int, layers: int, n: int) -> list[int]:
    """Which of the first `recomputed` layers offload instead: n of them, evenly spread below the
    last layer."""
    if n > most_offloaded(recomputed, layers):
        raise UserError(f"model.offload_layers={n}: at most a third of the recomputing layers below the last "
                        f"({most_offloaded(recomputed, layers)} here), so that each one's copies back overlap "
                        f"the layers between")
    span = min(recomputed, layers - 1)
    return [int((k + 0.5) * span / n) for k in range(n)]


def model_storages(model: torch.nn.Module) -> set[int]:
    """Data pointers of the model's own tensors (weights, LoRA included, buffers, 4-bit
    quantization states): a layer's graph saves them too (as views), and they are not activations."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return {t.untyped_storage().data_ptr() for t in tensors}


def storages_in(values: Any) -> set[int]:
    """Data pointers of the tensors among `values` (one level of tuples: the rotary embeddings)."""
    flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
    return {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}


class ActivationOffload:
    """The saved-tensor hooks, the offloaded inputs and the copy bookkeeping of one model."""

    def __init__(self, model: torch.nn.Module, offloaded: list[int], layers: int, device: torch.device,
                 inputs: Sequence[int] = ()):
        self.offloaded, self.layers, self.device = offloaded, layers, device
        self.inputs = list(inputs)
        """The recomputing layers whose checkpointed input goes to host memory (model.offload_inputs)."""
        self.skipped = model_storages(model)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.saved: dict[int, list[Offloaded]] = {}
        """Each offloaded layer's host copies from its latest forward, until their prefetch."""
        self.in_flight: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()
        """GPU tensors copied to the host, not yet freed: (layer, tensor, copy done; None on the CPU)."""
        self.arenas: dict[int, torch.Tensor] = {}
        """Each offloading layer's host memory, reused every micro-batch: allocating pinned memory
        takes about 0.5 s a GiB and synchronizes the GPU, so a new tensor shape (a step's shorter
        last row) must not allocate."""
        self.filled: dict[int, int] = {}
        """Bytes of its arena the layer's current forward has used (or would have)."""
        self.forwards: dict[int, int] = {}
        """How many forwards each offloading layer has run (the arena's generation)."""
        self.copied_bytes = 0
        """Bytes the latest forward copied to the host (train.py reports it)."""
        self.brought_back: list[Offloaded] = []
        """This backward's copies back, until the next forward (`_drop_unread`)."""
        self.inputs_back: dict[int, OffloadedInput] = {}
        """Inputs put back whose recompute has not yet read them (until the next forward)."""
        self.late_copies = 0
        """Copies back that began only when the backward needed them (a missed prefetch: a wait)."""
        self.held: dict[int, OffloadedInput] = {}
        """Each input-offloading layer's input from its latest forward, until its copy back starts."""
        self.inputs_in_flight: deque[OffloadedInput] = deque()
        """Inputs copied to the host whose GPU storage is not yet freed."""
        self.prefetches = {i: [j for j in sorted({*offloaded, *self.inputs}) if i - LEAD <= j < i]
                           for i in range(layers)}
        """The offloaded layers, and the layers with offloaded inputs, whose copies back each layer's
        backward starts."""

    def call(self, index: int, inner: Callable[..., Any]) -> Callable[..., Any]:
        """The function layer `index` runs its forward through: `inner` (recompute, or a plain
        call; a recompute from an input that goes to the host and back) or, for an offloaded layer,
        the call under the offloading hooks; then the hook that starts the copies back of the layers
        below it."""
        return partial(self._call, index, inner)

    def _call(self, index: int, inner: Callable[..., Any], forward: Callable[..., Any], *args: Any) -> Any:
        if index == 0:
            self._drop_unread()
            self.copied_bytes = 0
        self._release(index)
        if index in self.offloaded and torch.is_grad_enabled():
            self._start_forward(index)
            self.saved[index] = []
            # the call's keyword tensors (rotary embeddings, masks) are every layer's: copying them frees nothing
            shared = storages_in(getattr(forward, "keywords", {}).values())
            with torch.autograd.graph.saved_tensors_hooks(partial(self._pack, index, shared), self._unpack):
                out = forward(*args)
        else:
            if index in self.inputs and torch.is_grad_enabled() and args:  # args[0]: the hidden states
                held = self._copy_input(index, args[0])
                if held is not None:  # the checkpoint recomputes through this wrapper: the input is back first
                    forward = partial(self._with_input_back, held, forward)
            out = inner(forward, *args)
        hidden = out[0] if isinstance(out, tuple) else out
        if self.prefetches[index] and hidden.requires_grad:
            hidden.register_hook(partial(self._backward_starts, index))
        return out

    def _start_forward(self, index: int) -> None:
        """Before an offloading layer's forward: an arena as large as its largest forward so far
        needed (the first forward, and a larger one, place their tensors in memory of their own; the
        old arena lives on in the host copies still waiting for their backward)."""
        arena, need = self.arenas.get(index), self.filled.get(index, 0)
        if need and (arena is None or arena.numel() < need):
            self.arenas[index] = torch.empty(need, dtype=torch.uint8, pin_memory=self.stream is not None)
        self.filled[index] = 0
        self.forwards[index] = self.forwards.get(index, 0) + 1

    def _pack(self, index: int, shared: set[int], t: torch.Tensor) -> torch.Tensor | Offloaded:
        storage = t.untyped_storage().data_ptr()
        if (t.device != self.device or t.nbytes < MIN_BYTES or not t.is_contiguous()
                or storage in self.skipped or storage in shared):
            return t
        saved = Offloaded(index, self._host_place(index, t), self.forwards[index])
        done = self._copy(saved.host, t)
        self.in_flight.append((index, t, done))  # t lives until a later layer's _release
        self.saved[index].append(saved)
        self.copied_bytes += t.nbytes
        return saved

    def _copy_input(self, index: int, hidden: torch.Tensor) -> OffloadedInput | None:
        """Start copying a recomputing layer's input to the host; None where its storage is not
        exactly the input (freeing it would free other tensors too)."""
        storage = hidden.untyped_storage()
        if (hidden.device != self.device or not hidden.is_contiguous() or hidden.storage_offset()
                or storage.nbytes() != hidden.nbytes or not hidden.nbytes or not storage.resizable()):
            return None
        self._start_forward(index)
        source = storage_bytes(hidden)
        host = self._host_place(index, source)
        held = OffloadedInput(index, hidden, host, self.forwards[index], done=self._copy(host, source))
        self.held[index] = held
        self.inputs_in_flight.append(held)
        self.copied_bytes += hidden.nbytes
        return held

    def _copy(self, target: torch.Tensor, source: torch.Tensor) -> torch.cuda.Event | None:
        """target <- source on the copy stream, after the compute stream's work so far (which wrote
        source, or last used target's memory); the event records the copy's end (None on the CPU)."""
        if self.stream is None:
            target.copy_(source)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            target.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return done

    def _with_input_back(self, held: OffloadedInput, forward: Callable[..., Any], *args: Any) -> Any:
        """The layer's forward, run by the checkpoint: first in the forward pass (the input is still
        there), then in the backward's recompute, which reads the input put back into its storage."""
        if held.tensor.untyped_storage().nbytes():
            if self.inputs_back.get(held.layer) is held:  # put back: read now, no reference left here after
                del self.inputs_back[held.layer]
                self._wait(held.ready)
            return forward(*args)
        if held.forward != self.forwards[held.layer]:
            raise second_forward(held.layer, "input (model.offload_inputs)")
        self.late_copies += 1  # not put back ahead of time: put back now, and wait for it
        self._put_back(held)
        return self._with_input_back(held, forward, *args)

    def _put_back(self, held: OffloadedInput) -> None:
        """Reallocate the input's storage (on the compute stream) and copy its bytes back into it.
        GPU memory: one input, LEAD layers early."""
        self.held.pop(held.layer, None)
        held.tensor.untyped_storage().resize_(held.host.numel())
        held.ready = self._copy(storage_bytes(held.tensor), held.host)
        self.inputs_back[held.layer] = held

    def _host_place(self, index: int, t: torch.Tensor) -> torch.Tensor:
        """Where t's host copy goes: the next aligned bytes of the layer's arena. Reusing them is
        safe: the copies out of this micro-batch and back of the previous one share one stream."""
        start = -(-self.filled[index] // ALIGN) * ALIGN
        self.filled[index] = start + t.nbytes
        arena = self.arenas.get(index)
        if arena is None or arena.numel() < start + t.nbytes:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=self.stream is not None)
        return arena[start:start + t.nbytes].view(t.dtype).view(t.shape)

    def _release(self, index: int) -> None:
        """Before layer `index`'s forward: free the GPU tensors of the offloaded layers at least
        RELEASE_AFTER below it (all of them before the last layer, so none is left at the
        backward's peak). The compute stream first waits for their copies (on the GPU, no CPU
        sync), so the work that reuses their memory runs after the copies have read it."""
        last = index == self.layers - 1
        while self.in_flight and (last or self.in_flight[0][0] <= index - RELEASE_AFTER):
            self._wait(self.in_flight.popleft()[2])
        while self.inputs_in_flight and (last or self.inputs_in_flight[0].layer <= index - INPUT_RELEASE_AFTER):
            held = self.inputs_in_flight.popleft()
            self._wait(held.done)
            held.tensor.untyped_storage().resize_(0)  # frees the GPU memory; the checkpoint keeps the tensor

    def _wait(self, event: torch.cuda.Event | None) -> None:
        """The compute stream waits for a copy (on the GPU: no CPU sync). None: a CPU copy, done."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _drop_unread(self) -> None:
        """At a new forward: the copies back of the last backward are all read, except where it
        stopped early. Those GPU tensors were allocated on the compute stream and written on the
        copy stream: the compute stream waits for the copy before their memory can be reused."""
        for saved in [*self.brought_back, *self.inputs_back.values()]:
            self._wait(saved.ready)
        for saved in self.brought_back:
            saved.back = None
        # inputs a cut-short backward never put back: their graph is gone with it
        self.brought_back, self.inputs_back, self.held = [], {}, {}

    def _backward_starts(self, index: int, grad: torch.Tensor) -> None:
        for j in self.prefetches[index]:  # those not already started by the layer above
            if j in self.saved:
                self._prefetch(j)
            elif j in self.held:
                self._put_back(self.held[j])

    def _prefetch(self, layer: int) -> None:
        """Start copying `layer`'s saved tensors back to the GPU (on the copy stream, after their
        copies out). GPU memory: that layer's tensors, LEAD layers early."""
        for saved in self.saved.pop(layer):
            self._bring_back(saved)

    def _bring_back(self, saved: Offloaded) -> None:
        # allocated on the compute stream, which may still be using that memory: _copy waits for it
        saved.back = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=self.device)
        saved.ready = self._copy(saved.back, saved.host)
        self.brought_back.append(saved)

    def _unpack(self, saved: torch.Tensor | Offloaded) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.forward != self.forwards[saved.layer]:  # its arena bytes may hold a later forward's
            raise second_forward(saved.layer, "activations (model.offload_layers)")
        if saved.back is None:  # not prefetched (or unpacked twice): copy it back now, and wait for it
            self.late_copies += 1
            self._bring_back(saved)
        self._wait(saved.ready)
        back, saved.back = saved.back, None
        return back
