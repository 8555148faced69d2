"""Weights written for from_pretrained, one piece at a time, into a cache folder it then reads as it
reads a downloaded model: a random model (model.random_init), or, for a sharded run (model.shard), a
real bf16 checkpoint re-written pre-quantized.

Random: the model is built on the meta device (shapes, no memory) and materialized one decoder layer
at a time: initialised by the model's own `_init_weights` under a seed of the layer's own, written,
and freed. So at most one layer exists at once (1.7 GB of bf16 at 70B, whose whole model is 138 GB),
and the same seed writes the same weights on every run.

Pre-quantized (a sharded run's 4-bit form): NF4-quantized by bitsandbytes in the layout
transformers' save_pretrained gives a 4-bit model (37 GB at 70B), which loads to the very bytes that
quantizing the bf16 form on load gives. A sharded run loads its model on the CPU, every rank the
whole of it: from a pre-quantized copy each rank maps the files (4.5 GiB resident per rank at 70B),
where loading bf16 would quantize the whole model on every rank's CPU (37 GB of host memory a rank).
A real checkpoint is copied one tensor at a time, once per machine, on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PretrainedConfig
from transformers.integrations import replace_with_bnb_linear
from transformers.quantizers.base import HfQuantizer

from qlora.errors import UserError

INDEX = "model.safetensors.index.json"


def cached_random_model(config: PretrainedConfig, seed: int, device: torch.device, cache: str,
                        quant: BitsAndBytesConfig | None, trust_remote_code: bool) -> Path:
    """The folder of a random model of `config` (pre-quantized with `quant`, else bf16), written if
    the cache does not hold it yet. The key covers the architecture, the seed and the 4-bit format."""
    form = quant.to_json_string() if quant is not None else "bf16"
    key = hashlib.sha256(f"{config.to_json_string()}|{seed}|{form}".encode()).hexdigest()[:16]
    return cached(Path(cache) / key, lambda tmp: write_random(config, seed, device, quant, tmp, trust_remote_code))


def cached_4bit_copy(source: str, config: PretrainedConfig, device: torch.device, cache: str,
                     quant: BitsAndBytesConfig, trust_remote_code: bool) -> Path:
    """The folder of a pre-quantized copy of the bf16 safetensors checkpoint `source` (a local folder,
    or a hub name: its local snapshot), written if the cache does not hold it yet. The key covers
    the source's files (path, names, sizes) and the 4-bit format."""
    if getattr(config, "quantization_config", None) is not None:
        raise UserError(f"model.shard: {source!r} is quantized already; sharding needs its bf16 weights "
                        f"(it stores the 4-bit bytes as bf16 itself)")
    folder = checkpoint_folder(source)
    files = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"model.shard: {source!r} holds no safetensors files to quantize")
    key = hashlib.sha256(f"{folder.resolve()}|{files}|{quant.to_json_string()}".encode()).hexdigest()[:16]
    return cached(Path(cache) / f"4bit-{key}",
                  lambda tmp: write_4bit_copy(folder, config, device, quant, tmp, trust_remote_code))


def checkpoint_folder(source: str) -> Path:
    if Path(source).is_dir():
        return Path(source)
    try:  # from the local cache when offline (qlora/hub.py)
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {source!r}: {str(e).splitlines()[0]}") from None


def cached(out: Path, write: Callable[[Path], None]) -> Path:
    """`out`, written by `write(folder)` unless it holds a model already: into a temporary folder
    renamed at the end, so a killed run never leaves a half-written cache entry."""
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed write of an earlier process with this pid
    try:
        write(tmp)
        tmp.rename(out)
    except OSError:  # another machine's rank wrote the same weights first (a shared cache), or a full disk
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # up to 37 GB at 70B
    return out


def write_random(config: PretrainedConfig, seed: int, device: torch.device, quant: BitsAndBytesConfig | None,
                 out: Path, trust_remote_code: bool) -> None:
    """One safetensors file per decoder layer (and one for the rest: embeddings, final norm, head),
    an index, and config.json (with the quantization_config when pre-quantized). `device` draws the
    numbers: a GPU's generator draws other numbers than a CPU's, as it does for from_config."""
    model = meta_model(config, trust_remote_code)
    encode = encoder(config, quant, device, trust_remote_code)
    tied = set(model.all_tied_weights_keys)  # weights that are another's: saved once, under the other name
    out.mkdir(parents=True)
    index = {}
    for i, group in enumerate(module_groups(model)):
        # a seed per group: the weights of a layer do not depend on how the others were drawn
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}|{i}".encode()).digest()[:7], "big"))
        tensors = {}
        for name, module in group:
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                model._init_weights(module)
            for key, param in module.named_parameters(prefix=name, recurse=False):
                if key not in tied:
                    tensors.update(encode(key, param.detach()))
            module.to("meta")  # frees the layer's memory
        write_part(out, f"model-{i + 1:05d}.safetensors", tensors, index)
    finish(out, index, config, quant)


def write_4bit_copy(source: Path, config: PretrainedConfig, device: torch.device, quant: BitsAndBytesConfig,
                    out: Path, trust_remote_code: bool) -> None:
    """Each safetensors file of `source` as a file of `out`, one tensor at a time (quantized on
    `device`)."""
    encode = encoder(config, quant, device, trust_remote_code)
    out.mkdir(parents=True)
    index = {}
    for path in sorted(source.glob("*.safetensors")):
        tensors = {}
        with safe_open(path, framework="pt", device="cpu") as f:  # memory-mapped: one tensor read at a time
            for key in f.keys():
                tensors.update(encode(key, f.get_tensor(key)))
        write_part(out, path.name, tensors, index)
    finish(out, index, config, quant)


def meta_model(config: PretrainedConfig, trust_remote_code: bool) -> torch.nn.Module:
    """The model's modules and shapes, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=trust_remote_code)


def encoder(config: PretrainedConfig, quant: BitsAndBytesConfig | None, device: torch.device,
            trust_remote_code: bool) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """How a checkpoint tensor is written: with `quant`, the weight of a Linear layer that
    from_pretrained quantizes as NF4 (on `device`), everything else (biases, norms, embeddings, the
    head) as bf16."""
    if quant is None:
        return cpu_bf16
    quantized, to_4bit = quantized_linears(meta_model(config, trust_remote_code), quant), quantize_weight(quant)

    def encode(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        module, _, name = key.rpartition(".")
        return to_4bit(key, tensor.to(device)) if name == "weight" and module in quantized else cpu_bf16(key, tensor)
    return encode


def write_part(out: Path, file: str, tensors: dict[str, torch.Tensor], index: dict[str, str]) -> None:
    """One safetensors file of the checkpoint, its tensors entered in `index`."""
    save_file(tensors, out / file, metadata={"format": "pt"})
    index.update(dict.fromkeys(tensors, file))


def finish(out: Path, index: dict[str, str], config: PretrainedConfig, quant: BitsAndBytesConfig | None) -> None:
    """The index of the files written and config.json, with the quantization_config when pre-quantized."""
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config stays as it is
    config.dtype = torch.bfloat16
    if quant is not None:
        config.quantization_config = quant.to_dict()
    config.save_pretrained(out)


def quantized_linears(meta_model: torch.nn.Module, quant: BitsAndBytesConfig) -> set[str]:
    """The names of the Linear modules that from_pretrained turns into 4-bit ones, by transformers'
    own rule (the LM head, tied weights and a model's fp32 modules stay unquantized)."""
    skip = HfQuantizer.get_modules_to_not_convert(meta_model, quant.llm_int8_skip_modules,
                                                  meta_model._keep_in_fp32_modules)
    converted = replace_with_bnb_linear(meta_model, modules_to_not_convert=skip, quantization_config=quant)
    return {name for name, m in converted.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def module_groups(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Module]]]:
    """The modules that own parameters, grouped by decoder layer (the model's `_no_split_modules`),
    the modules outside any layer last."""
    layers = [name for name, m in model.named_modules() if type(m).__name__ in (model._no_split_modules or ())]
    if not layers:  # one group would be the whole model in memory at once
        raise UserError(f"model.random_init: {type(model).__name__} names no decoder layer class "
                        f"(_no_split_modules), so its random weights cannot be written one layer at a time")
    groups: dict[str, list] = {name: [] for name in layers}
    rest = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        owner = next((layer for layer in layers if name == layer or name.startswith(layer + ".")), None)
        (groups[owner] if owner is not None else rest).append((name, module))
    return [*groups.values(), rest]


def quantize_weight(quant: BitsAndBytesConfig) -> Callable[[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A weight as save_pretrained writes a 4-bit one: the packed NF4 bytes under its own name and
    the quantization state (absmax, code, nested statistics) under `name.<key>`."""
    def encode(key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        # bitsandbytes' defaults for Params4bit, which from_pretrained uses (blocksize 64)
        packed, state = bnb.functional.quantize_4bit(
            weight.to(torch.bfloat16), blocksize=64, compress_statistics=quant.bnb_4bit_use_double_quant,
            quant_type=quant.bnb_4bit_quant_type, quant_storage=quant.bnb_4bit_quant_storage)
        entries = {key: packed, **{f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}}
        return {k: v.cpu() for k, v in entries.items()}
    return encode


def cpu_bf16(key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: weight.to(torch.bfloat16).cpu()}
