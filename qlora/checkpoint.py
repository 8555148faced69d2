"""The run directory and what is saved in it.

    <output_dir>/config.yaml      the resolved config of the run
    <output_dir>/metrics.jsonl    one line per optimizer step
    <output_dir>/final/           adapter (safetensors) + tokenizer + config.yaml
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from qlora.config import Config
from qlora.errors import UserError


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
