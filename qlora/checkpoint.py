"""The run directory and what is saved in it.

    <output_dir>/config.yaml                  the resolved config of the run
    <output_dir>/metrics.jsonl                one line per optimizer step
    <output_dir>/checkpoints/step-00000010/   everything a resume needs (see save_checkpoint)
    <output_dir>/final/                       adapter (safetensors) + tokenizer + config.yaml

A checkpoint is written into a temporary folder, flushed to disk, then renamed into place, so a
run killed at any moment leaves every earlier checkpoint intact. Loading never runs code: tensors
come from safetensors, the rest from `torch.load(weights_only=True)` and JSON, and every file is
checked against the SHA-256 in meta.json first.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qlora.config import Config
from qlora.errors import UserError

CHECKPOINTS = "checkpoints"
ADAPTER, OPTIMIZER, STATE, META = "adapter_model.safetensors", "optimizer.pt", "state.pt", "meta.json"
# Config keys a resumed run may change: they do not touch the numbers being computed.
HARMLESS = {"log.progress", "eval.source", "eval.split", "eval.batch_size", "eval.max_new_tokens",
            "eval.quantized", "train.save_every", "train.keep_last", "train.output_dir", "train.device",
            "model.random_init_cache",
            # speed and memory levers: the same examples per step, the same gradient up to rounding
            # (e.g. resume an out-of-memory run with fewer layers kept out of checkpointing)
            "model.gradient_checkpointing", "model.checkpoint_layers", "model.attn_implementation",
            "model.cudnn_attention", "model.compile_layers", "data.packing", "data.pack_length"}


def write_config(cfg: Config, directory: Path) -> None:
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")


def check_output_dir(cfg: Config, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless `overwrite`; writes nothing, so it can run before
    the model loads and a refused run leaves no trace."""
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"output directory {run_dir} is not empty (pass --overwrite to replace it)")


def prepare_run_dir(cfg: Config, overwrite: bool) -> Path:
    """Create the output directory (emptied when `overwrite`) and write the resolved config."""
    check_output_dir(cfg, overwrite)
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    write_config(cfg, run_dir)
    return run_dir


def save_final(model: Any, tokenizer: Any, cfg: Config, run_dir: Path) -> Path:
    """Adapter weights as safetensors + adapter_config.json (what PeftModel.from_pretrained reads),
    the tokenizer, and the config that produced them."""
    final = run_dir / "final"
    model.save_pretrained(final, safe_serialization=True)
    tokenizer.save_pretrained(final)
    write_config(cfg, final)
    return final


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: Path, step: int, model: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, cfg: Config, data_fingerprint: str,
                    progress: dict[str, Any], keep_last: int) -> Path:
    """Adapter, optimizer (8-bit states included), scheduler, GradScaler, RNG states, step and
    the config, as checkpoints/step-N. Returns its path; older ones beyond `keep_last` are removed."""
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(get_peft_model_state_dict(model), tmp / ADAPTER)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": rng_state(), "progress": progress}, tmp / STATE)
    write_config(cfg, tmp)
    files = {p.name: sha256(p) for p in tmp.iterdir()}
    (tmp / META).write_text(json.dumps({"step": step, "data_fingerprint": data_fingerprint, "files": files}))
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
    data_fingerprint: str
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def find_checkpoint(run_dir: Path, path: str | None) -> Path:
    """`path`, or the latest checkpoint of the run directory when None."""
    if path is not None:
        if not Path(path).is_dir():
            raise UserError(f"checkpoint not found: {path}")
        return Path(path)
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"no checkpoint to resume in {run_dir / CHECKPOINTS}")
    return found[-1]


def load_checkpoint(path: Path, device: torch.device) -> Checkpoint:
    """Verify every file against meta.json, then load without running any pickled code."""
    try:
        meta = json.loads((path / META).read_text())
        for name, digest in meta["files"].items():
            if sha256(path / name) != digest:
                raise UserError(f"checkpoint {path}: {name} does not match its checksum (truncated or changed)")
        return Checkpoint(
            path=path, step=meta["step"], data_fingerprint=meta["data_fingerprint"],
            config=yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")),
            adapter=load_file(path / ADAPTER, device=str(device)),
            optimizer=torch.load(path / OPTIMIZER, map_location=device, weights_only=True),
            state=torch.load(path / STATE, map_location="cpu", weights_only=True))
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError, yaml.YAMLError,
            SafetensorError, pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile) as e:
        raise UserError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def check_compatible(cfg: Config, ckpt: Checkpoint, data_fingerprint: str) -> list[str]:
    """Refuse a resume whose numbers would differ from the unbroken run; return the harmless
    differences so the caller can list them."""
    before, now = _flat(ckpt.config), _flat(cfg.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    fatal = [k for k in changed if k not in HARMLESS]
    if fatal:
        raise UserError("cannot resume: the config differs from the checkpoint's in " + ", ".join(
            f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in fatal))
    if data_fingerprint != ckpt.data_fingerprint:
        raise UserError("cannot resume: the tokenized data differ from the checkpoint's "
                        "(data file or tokenizer changed)")
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed]


def restore(ckpt: Checkpoint, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
            scaler: torch.amp.GradScaler) -> None:
    """Put the run back where the checkpoint left it. Call last before the loop: building the
    model consumes random numbers, and the RNG states restored here must be the loop's."""
    result = set_peft_model_state_dict(model, ckpt.adapter)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {ckpt.path}: adapter has unexpected weights {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(ckpt.optimizer)
    repage_optimizer_state(optimizer)
    scheduler.load_state_dict(ckpt.state["scheduler"])
    scaler.load_state_dict(ckpt.state["scaler"])
    set_rng_state(ckpt.state["rng"])


def repage_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """bitsandbytes loads paged states back as ordinary device tensors (its issue 782), which can
    then no longer be evicted to host memory: copy them into fresh paged buffers. It pages only
    tensors of 1e5 elements or more, so LoRA r=16 on a 4096-wide model never pages at all."""
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


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step`: a run that died after its last checkpoint logged steps
    that the resumed run will compute again."""
    if path.exists():
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


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
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


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
