"""Typed, frozen configuration: YAML file -> dataclasses, with `section.key=value` overrides.

Every fact about a key lives on its field (`key(...)`): its doc, whether a resumed run may change
it, and how to turn it when memory runs out. `python -m qlora.config` prints them all.

Every problem (unknown key, wrong type, value out of range, impossible combination) is collected and
reported at once as a UserError, before anything heavy is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora.errors import UserError

Precision = Literal["fp16", "bf16", "fp32"]
_REQUIRED: Any = dataclasses.MISSING


def key(default: Any = _REQUIRED, doc: str = "", *, resume_safe: bool = False,
        lowers_peak: str | None = None) -> Any:
    """A config field and its facts.

    resume_safe: a resumed run may change it, because it changes neither which examples make an
        optimizer step nor the gradient (beyond floating-point rounding): output and logging
        settings, and the speed and memory levers.
    lowers_peak: how to turn it to lower the memory peak (printed after an out-of-memory error).
    """
    metadata = {"doc": doc, "resume_safe": resume_safe, "lowers_peak": lowers_peak}
    if isinstance(default, dict):  # a mutable default: each config gets its own copy
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    name: str = key(doc="Hub id or local directory of the base model.")
    arch: str | None = key(None, "Local directory whose config.json gives the architecture: random_init and "
                                 "the memory estimate read it, so nothing is downloaded. Default: name.")
    tokenizer: str | None = key(None, "Hub id or local directory of the tokenizer. Default: name.")
    random_init: bool = key(False, "Build random weights at the architecture's real shape (cached on disk) "
                                   "and load them through the same 4-bit path: offline runs, tests, memory audits.")
    random_init_cache: str = key(".cache/random_init", "Where random_init keeps its weights, and a sharded run "
                                                        "its pre-quantized copy of the model.", resume_safe=True)
    trust_remote_code: bool = key(False, "Let transformers run model code shipped with the checkpoint.")
    quant_type: Literal["nf4", "fp4"] = key("nf4", "4-bit data type of the frozen base weights.")
    double_quant: bool = key(True, "Quantize the 4-bit blocks' scales too (8-bit instead of fp32 absmax).")
    recompute_activations: bool = key(
        True, "Gradient checkpointing: each decoder layer keeps only its input and recomputes its "
              "activations in backward (about a third more compute, a fraction of the memory).",
        resume_safe=True, lowers_peak="=true")
    recompute_layers: int | None = key(
        None, "With recompute_activations, recompute only the first N decoder layers (null: all). A layer "
              "left out keeps its activations and skips the recompute: spare memory bought back as speed.",
        resume_safe=True, lowers_peak="=null (every layer)")
    recompute_reentrant: bool = key(
        False, "Recompute with torch.utils.checkpoint's reentrant variant (the older one: recomputes inside "
               "autograd's backward, and needs inputs that require grad) instead of the non-reentrant one; "
               "the same gradient (tests/test_loop.py). For comparing the two under FSDP, where bitsandbytes "
               "reports them behaving differently (bitsandbytes issue 1252).", resume_safe=True)
    offload_layers: int = key(
        0, "N of the recomputing layers (spread among them, below the last layer; at most a third of them) "
           "instead copy what their forward saves to pinned host memory, and back before their backward "
           "(qlora/offload.py): no recompute and the same numbers as a layer that keeps its activations, for "
           "host<->GPU copies that overlap the compute of the layers in between (and about N layers' "
           "activations of pinned host memory). Fast while the copies keep up with the compute. The memory "
           "plan offloads one recomputing layer in six on one GPU.", resume_safe=True)
    offload_inputs: bool = key(
        False, "The recomputing layers (below the last one) keep the input they recompute from in pinned host "
               "memory instead of on the GPU (qlora/offload.py): one [tokens, hidden] tensor a layer (64 MiB for "
               "Llama-2-7B's rows of 8,192 in bf16), copied out in the forward and back two layers ahead in the "
               "backward, for the same numbers; as much pinned host memory. The memory plan turns it on on one "
               "GPU where the memory it frees buys speed.", resume_safe=True)
    compile_layers: bool = key(
        False, "torch.compile each decoder layer (dynamic shapes): fuses the norms, rotary embedding, LoRA "
               "scaling and activation that otherwise run as dozens of memory-bound kernels. The first "
               "step pays the compile (the tutorial config: 18 s on an H200, 7.5 s with a warm cache); a debugger "
               "cannot step into the layers.",
        resume_safe=True)
    lean_layers: bool = key(
        False, "With compile_layers, the layers that keep their activations (neither recomputing nor offloading) "
               "are compiled to save less (torch's activation memory budget) and recompute the rest inside their "
               "own backward, matmuls included, with the forward's LoRA dropout masks (qlora/lean.py): the same "
               "gradient, though on CUDA other dropout masks than kept layers draw; Llama-2-7B at rows of 8,192: "
               "0.31 GiB a layer instead of 1.03, for about half the cost of recomputing the whole layer. The "
               "memory plan turns it on where it is faster within the budget (Llama-layout models, one "
               "process).", resume_safe=True,
        lowers_peak="=true (with model.compile_layers=true)")
    dequantized_layers: int = key(
        0, "The first N decoder layers keep their frozen base weights dequantized, once, in the compute dtype "
           "instead of 4-bit (N >= the layer count: all): the numbers bitsandbytes dequantizes in every forward "
           "and backward, so the same loss and gradients (bit for bit on the CPU; on CUDA bitsandbytes' forward "
           "uses a fused kernel for inputs of up to 1,536 tokens, equal up to rounding), without that work "
           "(GPU time, and CPU launches each row), for 1.5 bytes more a weight (fp32: 3.5; 7B: 0.3 GiB a layer). The memory plan sets it with "
           "memory to spare.", resume_safe=True, lowers_peak="=0")
    upcast_non_quantized: bool = key(
        True, "Keep prepare_model_for_kbit_training's fp32 norms, embeddings and LM head (false: the compute "
              "dtype, which halves the residual stream's memory).", lowers_peak="=false")
    attn_implementation: Literal["sdpa", "eager", "varlen", "flex"] = key(
        "sdpa", "varlen: flash attention over each example's own tokens (qlora/attention.py); with packing "
                "it skips the masked blocks SDPA computes. Training only (bf16/fp16 on a GPU; the CPU runs "
                "one SDPA call per example); generation uses SDPA. flex: the same through torch's compiled "
                "flex attention, for what flash cannot compute (Gemma-2's soft-capped logits); any precision; "
                "the CPU runs one SDPA call per example, or eager attention where soft-capped; generation "
                "uses SDPA, or eager for Gemma-2.",
        resume_safe=True)
    shard: bool = key(
        False, "Under torchrun, shard the 4-bit base over the ranks with PyTorch FSDP (qlora/shard.py), "
               "instead of a whole model per rank: a model too large for one GPU. The adapters and their "
               "optimizer state stay whole on every rank. Needs train.precision=bf16 and upcast_non_quantized=false.",
        resume_safe=True)
    cudnn_attention: bool = key(
        False, "Let SDPA pick cuDNN's attention kernel. Off: on an H200 it spent 12-32 ms of CPU per call "
               "planning for each new sequence shape.", resume_safe=True)


@dataclass(frozen=True)
class LoraConfig:
    r: int = key(16, "Rank of each adapter pair (A: r x in, B: out x r).")
    alpha: int = key(32, "Scaling numerator: the adapter's update is multiplied by alpha / r.")
    dropout: float = key(0.05, "Dropout on the adapter's input.")
    target_modules: tuple[str, ...] = key(("q_proj", "k_proj", "v_proj", "o_proj"),
                                          "Linear layers that get adapters.")


@dataclass(frozen=True)
class DataConfig:
    source: str = key(doc="A KorQuAD-layout JSON file, a flat JSON/JSONL file, or a hub dataset id.")
    split: str = key("train", "Split to read when source is a hub dataset.")
    format: Literal["closed_book", "extractive", "chat", "chat_closed_book"] = key(
        "extractive", "closed_book: the question alone (the tutorial's Alpaca-style prompt); extractive: context + "
                      "question; chat / chat_closed_book: the same through the tokenizer's own chat template "
                      "(instruct models): the answer and the template's end-of-turn token are learned.")
    chat_template_kwargs: dict[str, Any] = key(
        {}, "Extra variables for the chat template, e.g. {enable_thinking: false} (Qwen3) or "
            "{date_string: 26 Jul 2024} (Llama-3.2 writes today's date into every prompt otherwise).")
    max_length: int = key(512, "Tokens per example, prompt + answer + its end token. Only the context is ever "
                               "cut to fit.",
                          lowers_peak="lower")
    limit: int | None = key(None, "Keep the first N examples after de-duplication and shuffling (null: all).")
    shuffle: bool = key(False, "Shuffle (with train.seed) before taking limit.")
    dedup_questions: bool = key(False, "Keep only the first example of each question text (the tutorial does).")
    group_by_length: bool = key(True, "Batch examples of similar length together (shuffled buckets), so "
                                      "little compute pads.")
    packing: bool = key(False, "Pack each optimizer step's examples into as few rows as fit: positions restart "
                               "per example and attention never crosses examples.", resume_safe=True)
    pack_length: int | None = key(
        None, "Tokens per packed row, one row per micro-batch (null: train.batch_size x max_length, the "
              "tokens of one unpacked micro-batch). Pair packing with model.attn_implementation=varlen (or "
              "flex): SDPA computes a packed row's block-diagonal attention densely.", resume_safe=True,
        lowers_peak="lower (with data.packing)")
    pack_rows_multiple: int = key(
        1, "With packing on N GPUs: make each step's packed rows a multiple of this many and spread the examples "
           "evenly over them, so every rank gets the same share of tokens (set it to the number of GPUs, or a "
           "multiple of every count you may resume on: the rows, and with them the dropout masks, do not depend "
           "on the number of ranks). 1: as few rows as fit.", resume_safe=True)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = key(doc="The run directory: config, metrics, checkpoints, final adapter.", resume_safe=True)
    seed: int = key(42, "Seeds the adapters' initial weights, the data order and dropout.")
    batch_size: int = key(4, "Examples per micro-batch.",
                          lowers_peak="lower (raise train.grad_accum to keep the examples per step)")
    grad_accum: int = key(4, "Micro-batches per optimizer step.")
    epochs: int = key(1, "Passes over the data (unless max_steps is set).")
    max_steps: int | None = key(None, "Optimizer steps; when set it replaces epochs (the data order cycles).")
    lr: float = key(2e-4, "Peak learning rate.")
    weight_decay: float = key(0.0, "AdamW weight decay.")
    warmup_ratio: float = key(0.03, "Share of the steps with linear warmup from 0; then a half cosine to 0.")
    max_grad_norm: float = key(1.0, "Clip the adapters' gradient to this global norm.")
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = key(
        "paged_adamw_8bit", "Paged: the 8-bit states live in CUDA unified memory, evicted to host RAM under "
                            "pressure.", lowers_peak="=paged_adamw_8bit")
    precision: Precision = key("fp16", "Autocast dtype of the compute; fp16 adds a GradScaler.")
    device: str = key("auto", '"auto" (cuda when available), "cuda", "cuda:N" or "cpu".', resume_safe=True)
    supervised_logits_only: bool = key(
        True, "Run the LM head and the loss only at positions that predict a supervised token.",
        resume_safe=True, lowers_peak="=true")
    save_every: int = key(0, "Save a resumable checkpoint every N optimizer steps (0: only at the end and "
                             "on SIGINT/SIGTERM).", resume_safe=True)
    keep_last: int = key(2, "How many checkpoints to keep.", resume_safe=True)
    progress_bar: bool = key(True, "Show the tqdm progress bar (metrics.jsonl is written either way).",
                             resume_safe=True)
    memory_cap_gib: float | None = key(
        None, "Cap what this process's caching allocator may hold on its GPU at this many GiB "
              "(torch.cuda.set_per_process_memory_fraction): an allocation past it fails as out of memory, so a "
              "large GPU acts as a smaller card. The CUDA context (about 0.75 GiB) and NCCL's buffers (about 1.2 "
              "GiB per rank, 1.8 at 4 ranks) come on top: for a 24 GB card (22.3 GiB), about 21.5, or 20.3 under "
              "torchrun (19.8 at 4 ranks). "
              "memory_budget_gib=auto plans within it. CUDA only.",
        resume_safe=True)
    memory_budget_gib: float | Literal["auto"] | None = key(
        "auto", "Plan for this much peak allocated GPU memory, in GiB: before the model loads, the run picks "
                "the fastest recompute setting that the memory estimate says fits (where none fits the config's "
                "packed rows: shorter rows; with model.shard, rows only), and prints it (qlora/plan.py; "
                "--estimate-memory lists every candidate). auto: this GPU's free memory at start less 8% (at least "
                "1 GiB; 1.25 GiB more under torchrun), and at most memory_cap_gib less that margin (NCCL's "
                "buffers are outside the cap); nothing on a CPU, nor with eager "
                "attention. A number "
                "for a GPU shared with other work (a 16 GB card holds 14.9 GiB; leave about 2 for the CUDA context "
                "and the allocator's slack: 13). null: no plan (every layer recomputes). A config that sets "
                "model.recompute_activations or model.recompute_layers keeps its own, and one that sets "
                "data.pack_length its rows.", resume_safe=True)


@dataclass(frozen=True)
class EvalConfig:
    source: str | None = key(None, "Questions to answer and score (KorQuAD-layout file or hub id); null: "
                                   "data.source.", resume_safe=True)
    split: str = key("validation", "Split to read when eval.source is a hub dataset.", resume_safe=True)
    batch_size: int = key(16, "Questions generated together.", resume_safe=True)
    max_new_tokens: int = key(32, "Generated tokens per answer; the prompt keeps data.max_length minus this.",
                              resume_safe=True)
    quantized: bool = key(True, "Load the base in 4-bit as in training; false: plain train.precision weights.",
                          resume_safe=True)


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# Keys of earlier versions, so an old config gets a pointer instead of a bare "unknown key".
RENAMED = {"model.gradient_checkpointing": "renamed to model.recompute_activations",
           "model.checkpoint_layers": "renamed to model.recompute_layers",
           "log.progress": "renamed to train.progress_bar",
           "model.load_in_4bit": "removed: training always loads 4-bit (eval.quantized=false evaluates "
                                 "plain weights)"}


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def key_fields() -> dict[str, dataclasses.Field]:
    """Every key as "section.name" -> its dataclass field (metadata: doc, resume_safe, lowers_peak)."""
    return {f"{section}.{f.name}": f for section, cls in _sections().items() for f in dataclasses.fields(cls)}


def resume_safe_keys() -> set[str]:
    return {name for name, f in key_fields().items() if f.metadata["resume_safe"]}


def peak_lowering_hints(leave_out: tuple[str, ...] = (), cfg: Config | None = None) -> str:
    """The keys that lower the memory peak and which way to turn them, as one line; with `cfg`,
    not the ones it has already turned that way."""
    return ", ".join(_lowering(name, f.metadata["lowers_peak"]) for name, f in key_fields().items()
                     if f.metadata["lowers_peak"] and name not in leave_out
                     and not (cfg is not None and _already_set(cfg, name, f.metadata["lowers_peak"])))


def _already_set(cfg: Config, name: str, hint: str) -> bool:
    """`cfg` has the value an "=value" hint names ("=null (every layer)": null)."""
    section, key = name.split(".")
    return hint.startswith("=") and _yaml(getattr(getattr(cfg, section), key)) == hint[1:].split(" ")[0]


def _lowering(name: str, hint: str) -> str:
    """"model.recompute_activations=true", "train.batch_size lower (...)"."""
    return f"{name}{hint}" if hint.startswith("=") else f"{name} {hint}"


def describe_keys() -> str:
    """Every key with its type, default and facts: what `python -m qlora.config` prints."""
    lines = []
    for name, f in key_fields().items():
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = "(required)" if value is _REQUIRED else _yaml(value)
        flags = [flag for flag, on in (("may change on resume", f.metadata["resume_safe"]),
                                       ("lowers the peak: " + _lowering(name, f.metadata["lowers_peak"] or ""),
                                        f.metadata["lowers_peak"])) if on]
        lines.append(f"{name}: {default}" + (f"  [{'; '.join(flags)}]" if flags else ""))
        lines.append(f"    {f.metadata['doc']}")
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    """A value as a config file writes it: true, null, [q_proj, v_proj]."""
    return yaml.safe_dump(_plain(value), default_flow_style=True).removesuffix("...\n").strip()


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
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: "
                        f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return raw


def given_keys(path: str | Path, overrides: list[str] = ()) -> set[str]:
    """The "section.key" names the file and the overrides set themselves (not left to defaults)."""
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return {f"{section}.{name}" for section, values in raw.items() if isinstance(values, dict) for name in values}


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (the value is parsed as YAML)."""
    name, sep, value = item.partition("=")
    parts = name.split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(f"override {item!r} must look like section.key=value")
    section, field_name = parts
    if section in raw and not isinstance(raw[section], dict):
        raise UserError(f"config section {section!r} must be a mapping")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        raise UserError(f"override {item!r}: the value is not valid YAML") from None
    raw.setdefault(section, {})[field_name] = parsed


def config_from_dict(raw: dict[str, Any]) -> Config:
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, cls in _sections().items():
        values = raw.get(name, {}) or {}
        if not isinstance(values, dict):
            problems.append(f"{name}: must be a mapping of keys")
            continue
        sections[name] = _build_section(name, cls, values, problems)
    for name in raw:
        if name in _sections():
            continue
        keys = raw[name] if isinstance(raw[name], dict) else {}
        moved = [f"{name}.{k}: {RENAMED[f'{name}.{k}']}" for k in keys if f"{name}.{k}" in RENAMED]
        problems.append("; ".join(moved) if moved else f"{name}: unknown section (allowed: {', '.join(_sections())})")
    if problems:
        raise UserError("invalid config: " + "; ".join(problems))
    return checked(Config(**sections))


def checked(cfg: Config) -> Config:
    """`cfg`, or one line naming every range and combination it breaks (check_values)."""
    if problems := check_values(cfg):
        raise UserError("invalid config: " + "; ".join(problems))
    return cfg


def _build_section(section: str, cls: type, values: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    before = len(problems)
    for name, value in values.items():
        if name not in hints:
            problems.append(f"{section}.{name}: " + RENAMED.get(f"{section}.{name}",
                                                                 f"unknown key (allowed: {', '.join(names)})"))
            continue
        try:
            kwargs[name] = _coerce(value, hints[name])
        except ValueError as e:
            problems.append(f"{section}.{name}: {e}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is _REQUIRED and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    problems.extend(f"{section}.{name}: required" for name in missing)
    return None if len(problems) > before else cls(**kwargs)


def _coerce(value: Any, hint: Any) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"expected a mapping of names to values, got {value!r}")
        return {k: _coerce(v, args[1]) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):  # the first that takes the value
            try:
                return _coerce(value, inner)
            except ValueError:
                pass
        names = [{float: "a number", int: "an integer", str: "a string", type(None): "null"}.get(a) or
                 " or ".join(map(str, typing.get_args(a))) for a in args]
        raise ValueError(f"expected {' or '.join(names)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not allowed (allowed: {', '.join(map(str, args))})")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is float:
        return _finite_float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"expected {hint.__name__}, got {value!r}")
    return value


def _finite_float(value: Any) -> float:
    """ints are floats too; YAML 1.1 reads "2e-4" as a string; inf and nan are never meant."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


def check_values(cfg: Config) -> list[str]:
    """Ranges and combinations that types alone cannot express."""
    t, d, lo, m = cfg.train, cfg.data, cfg.lora, cfg.model
    checks = [
        (t.batch_size >= 1, "train.batch_size: must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum: must be >= 1"),
        (t.epochs >= 1, "train.epochs: must be >= 1"),
        (t.max_steps is None or t.max_steps >= 1, "train.max_steps: must be >= 1 or null"),
        (t.lr > 0, "train.lr: must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay: must be >= 0"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio: must be in [0, 1) (warmup cannot be as long as training)"),
        (t.max_grad_norm > 0, "train.max_grad_norm: must be > 0"),
        (t.save_every >= 0, "train.save_every: must be >= 0"),
        (t.memory_budget_gib in (None, "auto") or t.memory_budget_gib > 0,
         "train.memory_budget_gib: must be > 0, auto or null"),
        (t.memory_cap_gib is None or t.memory_cap_gib > 0, "train.memory_cap_gib: must be > 0 or null"),
        (t.keep_last >= 1, "train.keep_last: must be >= 1"),
        (t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"train.device: {t.device!r} is not allowed (allowed: auto, cpu, cuda, cuda:N)"),
        (d.max_length >= 16, "data.max_length: must be >= 16"),
        (m.recompute_layers is None or m.recompute_layers >= 0, "model.recompute_layers: must be >= 0 or null"),
        (m.dequantized_layers >= 0, "model.dequantized_layers: must be >= 0"),
        (m.offload_layers >= 0, "model.offload_layers: must be >= 0"),
        (m.offload_layers == 0 or m.recompute_activations,
         "model.offload_layers: offloads some of the recomputing layers; needs model.recompute_activations=true"),
        (not m.shard or m.offload_layers == 0, "model.shard=true: needs model.offload_layers=0 (not tried under FSDP)"),
        (not m.offload_inputs or m.recompute_activations,
         "model.offload_inputs: offloads the recomputing layers' inputs; needs model.recompute_activations=true"),
        (not m.offload_inputs or not m.recompute_reentrant,
         "model.offload_inputs: needs model.recompute_reentrant=false (the reentrant recompute saves its inputs itself)"),
        (not m.shard or not m.offload_inputs, "model.shard=true: needs model.offload_inputs=false (not tried under FSDP)"),
        (not m.lean_layers or m.compile_layers, "model.lean_layers: the compiler plans what lean layers save; "
         "needs model.compile_layers=true"),
        (not m.shard or not m.lean_layers, "model.shard=true: needs model.lean_layers=false (not tried under FSDP)"),
        (not m.shard or m.attn_implementation != "flex",
         "model.shard=true: needs model.attn_implementation other than flex (not tried under FSDP)"),
        (m.recompute_layers is None or m.offload_layers <= m.recompute_layers // 3,
         "model.offload_layers: at most a third of model.recompute_layers (each one's copies back overlap the "
         "layers between)"),
        (not m.shard or m.dequantized_layers == 0,
         "model.shard=true: needs model.dequantized_layers=0 (FSDP shards the 4-bit weights)"),
        (m.attn_implementation != "varlen" or t.precision != "fp32" or t.device == "cpu",
         "model.attn_implementation=varlen: flash attention needs train.precision bf16 or fp16 on a GPU"),
        (not m.shard or t.precision == "bf16",
         "model.shard=true: needs train.precision=bf16 (FSDP's flat parameters hold the 4-bit weights as bf16)"),
        (not m.shard or not m.upcast_non_quantized,
         "model.shard=true: needs model.upcast_non_quantized=false (an FSDP unit flattens its frozen weights "
         "into one bf16 tensor)"),
        (cfg.eval.batch_size >= 1, "eval.batch_size: must be >= 1"),
        (1 <= cfg.eval.max_new_tokens < d.max_length, "eval.max_new_tokens: must be in [1, data.max_length)"),
        (d.limit is None or d.limit >= 1, "data.limit: must be >= 1 or null"),
        (d.pack_rows_multiple >= 1, "data.pack_rows_multiple: must be >= 1"),
        (d.pack_length is None or d.pack_length >= d.max_length,
         "data.pack_length: must be >= data.max_length (a row must hold the longest example)"),
        (lo.r >= 1, "lora.r: must be >= 1"),
        (lo.alpha > 0, "lora.alpha: must be > 0"),
        (0 <= lo.dropout < 1, "lora.dropout: must be in [0, 1)"),
        (len(lo.target_modules) > 0, "lora.target_modules: must name at least one module"),
    ]
    return [message for ok, message in checks if not ok]


if __name__ == "__main__":
    print(describe_keys())
    sys.exit(0)
