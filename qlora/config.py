"""Typed, frozen configuration: YAML file -> dataclasses, with `section.key=value` overrides.

Every problem (unknown key, wrong type, value out of range, impossible combination) is collected and
reported at once as a UserError, before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora.errors import UserError

Precision = Literal["fp16", "bf16", "fp32"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    """Hub id or local directory of the base model."""
    arch: str | None = None
    """Local directory whose config.json describes the architecture; random_init reads it so that no
    download is needed. Defaults to `name`."""
    tokenizer: str | None = None
    """Hub id or local directory of the tokenizer. Defaults to `name`."""
    random_init: bool = False
    """Build random weights of the architecture at its real shape (cached on disk) and load them
    through the same 4-bit path: offline runs, tests, memory audits."""
    random_init_cache: str = ".cache/random_init"
    trust_remote_code: bool = False
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None
    """With checkpointing on, checkpoint only the first N decoder layers (None: all). A layer left
    out keeps its activations and skips its recompute: spare memory bought back as speed."""
    compile_layers: bool = False
    """torch.compile each decoder layer (dynamic shapes): fuses the norms, rotary embedding, LoRA
    scaling and MLP activation that otherwise run as dozens of separate memory-bound kernels. The
    first step pays the compile (about a minute on a GPU)."""
    upcast_non_quantized: bool = True
    """Keep prepare_model_for_kbit_training's fp32 norms, embeddings and LM head (false: the
    compute dtype, which halves the residual stream's memory)."""
    attn_implementation: Literal["sdpa", "eager", "varlen"] = "sdpa"
    """varlen: flash attention over each example's own tokens (qlora/attention.py); with packing it
    skips the masked blocks SDPA computes. Training only (bf16/fp16 on a GPU); generation uses SDPA."""
    cudnn_attention: bool = False
    """Let SDPA pick cuDNN's attention kernel. Off: on an H200 it spent 12-32 ms of CPU per call
    planning for each new sequence shape (most of a short step); flash / memory-efficient kernels
    run instead."""


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DataConfig:
    source: str
    """Path to a KorQuAD-layout JSON, a flat JSON/JSONL file, or a hub dataset id."""
    split: str = "train"
    """Split to read when `source` is a hub dataset."""
    format: Literal["closed_book", "extractive"] = "extractive"
    max_length: int = 512
    """Tokens per example, prompt + answer + EOS. Only the context is ever cut to fit."""
    limit: int | None = None
    """Keep the first N examples after de-duplication and (optional) shuffling; None keeps all."""
    shuffle: bool = False
    """Shuffle (with train.seed) before taking `limit`."""
    dedup_questions: bool = False
    """Keep only the first example of each question text (the tutorial does this)."""
    group_by_length: bool = True
    """Batch examples of similar length together (shuffled buckets) so little compute pads."""
    packing: bool = False
    """Pack each optimizer step's examples into as few rows as fit; positions restart per example
    and attention never crosses examples."""
    pack_length: int | None = None
    """Tokens per packed row, one row per micro-batch (default train.batch_size x max_length, the
    tokens of one unpacked micro-batch). Pair packing with model.attn_implementation=varlen: SDPA
    computes a packed row's block-diagonal attention densely, pack_length^2 per row."""


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    seed: int = 42
    batch_size: int = 4
    grad_accum: int = 4
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; when set it replaces `epochs` (the data order cycles over epochs)."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = "paged_adamw_8bit"
    precision: Precision = "fp16"
    device: str = "auto"
    """"auto" (cuda when available), "cuda", "cuda:N" or "cpu"."""
    supervised_logits_only: bool = True
    """Compute the LM head only at positions that predict a supervised token."""
    save_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end and on SIGINT/SIGTERM)."""
    keep_last: int = 2
    """How many checkpoints to keep."""


@dataclass(frozen=True)
class EvalConfig:
    source: str | None = None
    """Questions to answer and score (KorQuAD layout file or hub id); None: data.source."""
    split: str = "validation"
    batch_size: int = 16
    max_new_tokens: int = 32
    """Generated tokens per answer; the prompt keeps data.max_length minus this."""
    quantized: bool = True
    """Load the base in 4-bit as in training; false: plain weights in train.precision."""


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True
    """Show the tqdm bar."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples -> lists so that the dict round-trips through YAML/JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML file, apply `section.key=value` overrides, check types and values."""
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (the value is parsed as YAML)."""
    key, sep, value = item.partition("=")
    parts = key.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"override {item!r} must look like section.key=value")
    section, name = parts
    if section in raw and not isinstance(raw[section], dict):
        raise UserError(f"config section {section!r} must be a mapping")
    raw.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else None


def config_from_dict(raw: dict[str, Any]) -> Config:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[f.name]
        values = raw.get(f.name, {}) or {}
        if not isinstance(values, dict):
            problems.append(f"{f.name}: must be a mapping of keys")
            continue
        sections[f.name] = _build_section(f.name, cls, values, problems)
    allowed = [f.name for f in dataclasses.fields(Config)]
    problems.extend(f"{name}: unknown section (allowed: {', '.join(allowed)})"
                    for name in raw if name not in allowed)
    if not problems:
        cfg = Config(**sections)
        problems.extend(check_values(cfg))
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))
    return cfg


def _build_section(section: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    before = len(problems)
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{section}.{key}: unknown key (allowed: {', '.join(names)})")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except ValueError as e:
            problems.append(f"{section}.{key}: {e}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kwargs]
    problems.extend(f"{section}.{name}: required" for name in missing)
    return None if len(problems) > before else cls(**kwargs)


def _coerce(value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not allowed (allowed: {', '.join(map(str, args))})")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"expected {hint.__name__}, got {value!r}")
    return value


def check_values(cfg: Config) -> list[str]:
    """Ranges and combinations that types alone cannot express."""
    t, d, lo = cfg.train, cfg.data, cfg.lora
    checks = [
        (t.batch_size >= 1, "train.batch_size: must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum: must be >= 1"),
        (t.epochs >= 1, "train.epochs: must be >= 1"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps: must be >= 1 or null"),
        (t.lr > 0, "train.lr: must be > 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio: must be in [0, 1) (warmup cannot be as long as training)"),
        (t.max_grad_norm > 0, "train.max_grad_norm: must be > 0"),
        (t.save_every >= 0, "train.save_every: must be >= 0"),
        (t.keep_last >= 1, "train.keep_last: must be >= 1"),
        (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"train.device: {t.device!r} is not allowed (allowed: auto, cpu, cuda, cuda:N)"),
        (d.max_length >= 16, "data.max_length: must be >= 16"),
        (cfg.model.checkpoint_layers is None or cfg.model.checkpoint_layers >= 0,
         "model.checkpoint_layers: must be >= 0 or null"),
        (cfg.model.attn_implementation != "varlen" or t.precision != "fp32" or t.device == "cpu",
         "model.attn_implementation=varlen: flash attention needs train.precision bf16 or fp16 on a GPU"),
        (cfg.eval.batch_size >= 1, "eval.batch_size: must be >= 1"),
        (1 <= cfg.eval.max_new_tokens < d.max_length, "eval.max_new_tokens: must be in [1, data.max_length)"),
        (d.limit is None or d.limit >= 1, "data.limit: must be >= 1 or null"),
        (d.pack_length is None or d.pack_length >= d.max_length,
         "data.pack_length: must be >= data.max_length (a row must hold the longest example)"),
        (lo.r >= 1, "lora.r: must be >= 1"),
        (lo.alpha > 0, "lora.alpha: must be > 0"),
        (0 <= lo.dropout < 1, "lora.dropout: must be in [0, 1)"),
        (len(lo.target_modules) > 0, "lora.target_modules: must name at least one module"),
    ]
    return [message for ok, message in checks if not ok]
