"""Shared fixtures: tokenizers of both families trained on the project's fixture, a tiny 4-bit
Llama with LoRA, and the path of the official dev file when this machine has it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.config import LoraConfig, ModelConfig
from qlora.model import build_model
from qlora.tiny import build_tokenizer, korquad_texts

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "configs" / "tiny" / "korquad_tiny.json"
TINY_YAML = ROOT / "configs" / "tiny.yaml"
DEV_FILE = ROOT.parent / "shared" / "data" / "KorQuAD_v1.0_dev.json"


@pytest.fixture(scope="session")
def sp_tokenizer():
    """Llama-2's layout: '▁' pieces, byte fallback, <s> prepended."""
    return build_tokenizer(korquad_texts(FIXTURE), "sentencepiece", 800)


@pytest.fixture(scope="session")
def bl_tokenizer():
    """GPT-2's layout: byte-level BPE, no BOS."""
    return build_tokenizer(korquad_texts(FIXTURE), "bytelevel", 800)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Builds the tiny random Llama through the real 4-bit + LoRA path."""
    import torch

    cache = tmp_path_factory.mktemp("random_init")

    def make(precision: str = "fp32", dropout: float = 0.0, seed: int = 0, upcast: bool = True,
             recompute_layers: int | None = None, attn: str = "sdpa", compile_layers: bool = False):
        cfg = ModelConfig(name=str(ROOT / "configs" / "tiny" / "model"), random_init=True,
                          random_init_cache=str(cache), upcast_non_quantized=upcast,
                          recompute_layers=recompute_layers, attn_implementation=attn,
                          compile_layers=compile_layers)
        return build_model(cfg, LoraConfig(dropout=dropout), precision, torch.device("cpu"), seed)

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml trained once through train.main: (run dir, random-init cache)."""
    import train

    out = tmp_path_factory.mktemp("run") / "tiny"
    cache = tmp_path_factory.mktemp("cache")
    code = train.main(["--config", str(TINY_YAML), f"train.output_dir={out}",
                       f"model.random_init_cache={cache}", "train.progress_bar=false"])
    assert code == 0
    return out, cache
