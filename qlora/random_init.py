"""model.random_init: a random model of an architecture at its real shape, written once into a cache
folder that from_pretrained then reads as it reads a downloaded model.

The model is built on the meta device (shapes, no memory) and materialized one decoder layer at a
time: initialised by the model's own `_init_weights` under a seed of the layer's own, written, and
freed. So at most one layer exists at once (1.7 GB of bf16 at 70B, whose whole model is 138 GB),
and the same seed writes the same weights on every run. The weights are written as bf16, or, for
model.shard, NF4-quantized by bitsandbytes as a pre-quantized 4-bit checkpoint (the layout
transformers' save_pretrained gives a 4-bit model: 37 GB at 70B), which loads to the very bytes
that quantizing the bf16 form on load gives.
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
    out = Path(cache) / key
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(f"{key}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed write of an earlier process with this pid
    try:
        write_random(config, seed, device, quant, tmp, trust_remote_code)
        tmp.rename(out)  # atomic: a killed run never leaves a half-written cache entry
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
    def meta_model() -> torch.nn.Module:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, trust_remote_code=trust_remote_code)

    model = meta_model()
    quantized = quantized_linears(meta_model(), quant) if quant is not None else set()
    encode_4bit = quantize_weight(quant) if quant is not None else cpu_bf16
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
                    # a 4-bit Linear's weight; its bias and every other parameter stay bf16
                    encode = encode_4bit if key == f"{name}.weight" and name in quantized else cpu_bf16
                    tensors.update(encode(key, param.detach()))
            module.to("meta")  # frees the layer's memory
        file = f"model-{i + 1:05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, file))
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
