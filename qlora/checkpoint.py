"""The run directory and what is saved in it.

    <output_dir>/config.yaml                  the resolved config of the run
    <output_dir>/metrics.jsonl                one line per optimizer step
    <output_dir>/memory.json                  memory by owner after the first step
    <output_dir>/checkpoints/step-00000010/   everything a resume needs (see save_checkpoint)
    <output_dir>/final/                       adapter (safetensors) + tokenizer + config.yaml

Only these belong to the run: `--overwrite` replaces them and leaves anything else in the folder
(e.g. evaluate.py's eval/) alone.

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place, so a
run killed at any moment leaves every earlier checkpoint intact. Loading never runs code: tensors
come from safetensors, the rest from `torch.load(weights_only=True)` and JSON, and every file is
checked against the SHA-256 in meta.json first.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qlora.config import Config, resume_safe_keys
from qlora.distributed import unwrap
from qlora.errors import UserError
from qlora.optim import TrainingState, in_layout
from qlora.shard import WRAPPED

CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.yaml", "metrics.jsonl", "memory.json", "memory_snapshot.pickle", CHECKPOINTS, "final")
ADAPTER, OPTIMIZER, STATE, META = "adapter_model.safetensors", "optimizer.pt", "state.pt", "meta.json"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter
FORMAT = 2  # meta.json's "format"; 2: config keys renamed (recompute_*, train.progress_bar), "totals"


def write_config(cfg: Config, directory: Path) -> None:
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")


def check_output_dir(cfg: Config, overwrite: bool) -> None:
    """Refuse an output directory that holds a run unless `overwrite`; writes nothing, so it can run
    before the model loads and a refused run leaves no trace."""
    run_dir = _directory(cfg)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found and not overwrite:
        raise UserError(f"output directory {run_dir} already holds a run ({', '.join(found)}); pass "
                        f"--overwrite to replace it, or --resume to continue it")


def _directory(cfg: Config) -> Path:
    """train.output_dir, refused when it names a file."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir {run_dir} is a file, not a directory")
    return run_dir


def holds_run_of(cfg: Config, run_dir: Path) -> bool:
    """The output directory holds an unfinished run of this very config (e.g. one that died before
    its first checkpoint)."""
    saved = run_dir / "config.yaml"
    return (saved.is_file() and not (run_dir / "final").exists()
            and yaml.safe_load(saved.read_text(encoding="utf-8")) == cfg.to_dict())


def open_run_dir(cfg: Config, start: "Start") -> Path:
    """The output directory, ready for the loop, with the resolved config written into it.
    Fresh run: the previous run's files are removed when `start.replace_run` (nothing else is).
    Resumed run: metrics.jsonl is cut back to the checkpoint's step (resumed into another
    directory, it starts from the checkpoint's run's metrics up to that step), and checkpoints of
    later steps, which belong to the abandoned steps, are removed."""
    run_dir = _directory(cfg)
    if start.checkpoint is None:
        check_output_dir(cfg, start.replace_run)
        for name in RUN_FILES:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, run_dir)
    if start.checkpoint is not None:
        metrics = run_dir / "metrics.jsonl"
        earlier = metrics if metrics.exists() else start.checkpoint.path.parent.parent / "metrics.jsonl"
        lines = earlier.read_text(encoding="utf-8").splitlines() if earlier.exists() else []
        metrics.write_text("".join(line + "\n" for line in lines
                                   if line.strip() and json.loads(line)["step"] <= start.step), encoding="utf-8")
        for later in list_checkpoints(run_dir):
            if int(later.name.removeprefix("step-")) > start.step:  # else --resume and keep_last would see them
                print(f"resume: removed {later}, a checkpoint of the steps after {start.step}")
                shutil.rmtree(later)
    return run_dir


@dataclass(frozen=True)
class Trained:
    """What training changed."""
    adapter: dict[str, torch.Tensor]
    """The trainable (LoRA) weights in PEFT's saved layout (adapter_model.safetensors)."""
    optimizer: dict[str, Any]
    """The optimizer's state_dict (the same layout with and without DDP or FSDP)."""


def trained_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Trained:
    """The adapters and the optimizer state of `model` (itself, DDP or FSDP: in each the adapters
    and their optimizer state are whole on every rank, so nothing is gathered)."""
    return Trained(peft_layout(trainable_weights(model)), optimizer.state_dict())


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights by their names in the PEFT model (FSDP's wrapper names taken
    out), in its parameter order (the order the optimizer holds them in)."""
    return {name.replace(WRAPPED, ""): p.detach() for name, p in unwrap(model).named_parameters() if p.requires_grad}


def peft_layout(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable weights by their names in the PEFT model, keyed as PEFT saves LoRA adapters (no
    bias, no DoRA): without the adapter's name ('...q_proj.lora_A.default.weight' ->
    '...q_proj.lora_A.weight'; tests/test_checkpoint.py holds it equal to peft's
    get_peft_model_state_dict, which finds the adapter layers by module name, and FSDP changes those)."""
    # copies: the adapters may be views into one flat tensor (qlora/optim.py), and safetensors
    # refuses tensors that share memory
    return {name.replace(f".{ADAPTER_NAME}.", "."): w.clone() for name, w in weights.items()}


def save_final(model: Any, adapter: dict[str, torch.Tensor], tokenizer: Any, cfg: Config, run_dir: Path) -> Path:
    """The adapter (trained_state's) as safetensors + the PEFT model's adapter_config.json (what
    PeftModel.from_pretrained reads), the tokenizer, and the config that produced them."""
    final = run_dir / "final"
    final.mkdir(parents=True, exist_ok=True)
    save_file(adapter, final / ADAPTER, metadata={"format": "pt"})  # as peft writes it
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.inference_mode = True  # as peft's save_pretrained writes it
    config.save_pretrained(final)
    tokenizer.save_pretrained(final)
    write_config(cfg, final)
    return final


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: Path, step: int, trained: Trained, state: TrainingState, cfg: Config,
                    data_fingerprint: str, totals: dict[str, Any], keep_last: int, world_size: int = 1) -> Path:
    """Adapter and optimizer (8-bit states included) of `trained`, scheduler, GradScaler, RNG
    states, step and the config, as checkpoints/step-N. Returns its path; older ones beyond
    `keep_last` are removed."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trained.adapter, tmp / ADAPTER)
    torch.save(trained.optimizer, tmp / OPTIMIZER)
    torch.save({"step": step, "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                "rng": rng_state(), "totals": totals}, tmp / STATE)
    write_config(cfg, tmp)
    files = {p.name: sha256(p) for p in tmp.iterdir()}
    (tmp / META).write_text(json.dumps({"format": FORMAT, "step": step, "data_fingerprint": data_fingerprint,
                                        "world_size": world_size, "files": files}))
    for path in tmp.iterdir():
        fsync(path)
    fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step
    os.rename(tmp, final)  # atomic: readers see the old set or the new one, never half of it
    fsync(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary folders of an interrupted save are ignored."""
    root = run_dir / CHECKPOINTS
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    world_size: int
    """How many processes wrote it (any number may resume it)."""
    data_fingerprint: str
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def find_checkpoint(run_dir: Path, path: str | None) -> Path:
    """`path`, or the latest checkpoint of the run directory when None."""
    if path is not None:
        if not (Path(path) / META).is_file():
            raise UserError(f"checkpoint not found: {path} (expected a folder with {META}, "
                            f"e.g. {run_dir / CHECKPOINTS / 'step-00000010'})")
        return Path(path)
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"no checkpoint to resume in {run_dir / CHECKPOINTS}")
    return found[-1]


def load_checkpoint(path: Path, device: torch.device) -> Checkpoint:
    """Verify every file against meta.json, then load without running any pickled code."""
    try:
        meta = json.loads((path / META).read_text())
        if meta.get("format") != FORMAT:
            raise UserError(f"checkpoint {path} was written by an earlier version of qlora-loop (format "
                            f"{meta.get('format', 1)}, this one reads {FORMAT}); finish that run with the "
                            f"version that started it")
        for name, digest in meta["files"].items():
            if sha256(path / name) != digest:
                raise UserError(f"checkpoint {path}: {name} does not match its checksum (truncated or changed)")
        return Checkpoint(
            path=path, step=meta["step"], world_size=meta.get("world_size", 1),
            data_fingerprint=meta["data_fingerprint"],
            config=yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")),
            adapter=load_file(path / ADAPTER, device=str(device)),
            optimizer=torch.load(path / OPTIMIZER, map_location=device, weights_only=True),
            state=torch.load(path / STATE, map_location="cpu", weights_only=True))
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError, yaml.YAMLError,
            SafetensorError, pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile) as e:
        raise UserError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def numbers_config(cfg: Config) -> list[tuple[str, Any]]:
    """The keys that change the numbers computed (all but those that may change on resume)."""
    safe = resume_safe_keys()
    return sorted((k, v) for k, v in _flat(cfg.to_dict()).items() if k not in safe)


def check_compatible(cfg: Config, ckpt: Checkpoint, data_fingerprint: str) -> list[str]:
    """Refuse a resume whose numbers would differ from the unbroken run; return the harmless
    differences so the caller can list them."""
    before, now = _flat(ckpt.config), _flat(cfg.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    safe = resume_safe_keys()
    fatal = [k for k in changed if k not in safe]
    if fatal:
        raise UserError("cannot resume: the config differs from the checkpoint's in " + ", ".join(
            f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in fatal))
    if data_fingerprint != ckpt.data_fingerprint:
        raise UserError("cannot resume: the tokenized data differ from the checkpoint's "
                        "(data file or tokenizer changed)")
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed]


@dataclass(frozen=True)
class Start:
    """Where the loop begins: step 0 of a fresh run, or a checkpoint's step and state."""
    step: int = 0
    """Optimizer steps already done."""
    totals: dict[str, Any] = field(default_factory=lambda: {"skipped_total": 0, "elapsed_s": 0.0})
    """Running totals that the metrics lines carry on across a resume."""
    checkpoint: Checkpoint | None = None
    replace_run: bool = False
    """A fresh start may replace the run files already in the output directory (--overwrite)."""

    @staticmethod
    def from_checkpoint(ckpt: Checkpoint) -> "Start":
        return Start(step=ckpt.step, totals=ckpt.state["totals"], checkpoint=ckpt)

    def restore_adapter(self, model: Any) -> None:
        """The checkpoint's adapter weights into the PEFT model, before DDP or FSDP wraps it
        (nothing to do for a fresh run)."""
        ckpt = self.checkpoint
        if ckpt is None:
            return
        result = set_peft_model_state_dict(model, ckpt.adapter)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"checkpoint {ckpt.path}: adapter has unexpected weights {result.unexpected_keys[:3]}")

    def restore(self, model: torch.nn.Module, state: TrainingState) -> None:
        """The rest of the run's state (`model`: as wrapped for training; its adapter restored by
        restore_adapter). Call it last before the loop: building the model consumes random
        numbers, and the RNG states restored here must be the loop's."""
        ckpt = self.checkpoint
        if ckpt is None:
            return
        try:  # the adapters' states as one flat tensor or one by one, as this run steps them
            state.optimizer.load_state_dict(in_layout(ckpt.optimizer, state))
        except (ValueError, RuntimeError) as e:
            raise UserError(f"checkpoint {ckpt.path}: its optimizer state does not fit this run's optimizer "
                            f"({str(e).splitlines()[0]}); resume with the train.optimizer, lora.* and "
                            f"model.shard settings it was written with") from None
        repage_optimizer_state(state.optimizer)
        state.scheduler.load_state_dict(ckpt.state["scheduler"])
        state.scaler.load_state_dict(ckpt.state["scaler"])
        set_rng_state(ckpt.state["rng"])

    def released(self) -> "Start":
        """This start without the checkpoint's tensors, once restored: the model and the optimizer
        hold copies of them, and on the GPU they would otherwise stay allocated for the whole run."""
        if self.checkpoint is None:
            return self
        return dataclasses.replace(self, checkpoint=dataclasses.replace(self.checkpoint, adapter={}, optimizer={}))


def repage_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """bitsandbytes loads paged states back as ordinary device tensors (its issue 782), which can
    then no longer be evicted to host memory: copy them into fresh paged buffers. It pages only
    tensors of 1e5 elements or more: the flat state of all adapters (qlora/optim.py), or one
    adapter's of that size."""
    if not getattr(optimizer, "is_paged", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("state1", "state2"):
                if key in state and p.device.type == "cuda" and p.numel() >= 1e5:
                    buffer = optimizer.get_state_buffer(p, dtype=state[key].dtype)
                    buffer.copy_(state[key])
                    state[key] = buffer


def data_fingerprint(rows: list[Any]) -> str:
    """Hash of every token id and label: changes with the data file, selection or tokenizer."""
    h = hashlib.sha256()
    for r in rows:
        h.update(np.asarray(r.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(r.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # a machine with fewer GPUs restores those it has
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
