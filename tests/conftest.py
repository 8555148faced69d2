"""Shared fixtures: tokenizers of both families trained on the project's fixture, a tiny 4-bit
Llama with LoRA, and the path of the official dev file when this machine has it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.config import LoraConfig, ModelConfig
from qlora.model import build_model
from qlora.families import FAMILIES
from qlora.tiny import build_family, build_tokenizer, korquad_texts

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
             recompute_layers: int | None = None, attn: str = "sdpa", compile_layers: bool = False,
             reentrant: bool = False, shard: bool = False, r: int = 16, dequantized_layers: int = 0,
             lean: bool = False, offload_inputs: bool = False):
        cfg = ModelConfig(name=str(ROOT / "configs" / "tiny" / "model"), random_init=True,
                          random_init_cache=str(cache), upcast_non_quantized=upcast,
                          recompute_layers=recompute_layers, attn_implementation=attn,
                          compile_layers=compile_layers, recompute_reentrant=reentrant, shard=shard,
                          dequantized_layers=dequantized_layers, lean_layers=lean,
                          offload_inputs=offload_inputs)
        return build_model(cfg, LoraConfig(r=r, dropout=dropout), precision, torch.device("cpu"), seed)

    return make


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """{family: (model dir, tokenizer dir)}: a toy of each family (qlora/families.py), built once."""
    root, texts = tmp_path_factory.mktemp("families"), korquad_texts(FIXTURE)
    return {name: build_family(name, texts, root / name) for name in FAMILIES}


REFERENCE = ["lora.r=64", "train.max_steps=12", "train.progress_bar=false"]
"""r=64 makes each LoRA matrix 4,096 elements, the size from which bitsandbytes keeps 8-bit optimizer
states; dropout stays on, so its masks must be the same whatever runs a step."""


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """configs/tiny.yaml + REFERENCE in this process, checkpoints at steps 4, 8 and 12: the run that
    resumed, restarted and many-process runs must equal. (run dir, random-init cache)."""
    import train

    out = tmp_path_factory.mktemp("reference") / "run"
    cache = tmp_path_factory.mktemp("cache")
    assert train.main(["--config", str(TINY_YAML), *REFERENCE, f"train.output_dir={out}",
                       f"model.random_init_cache={cache}", "train.save_every=4", "train.keep_last=3"]) == 0
    return out, cache


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


NOT_NUMBERS = {"tokens_per_s", "step_s", "elapsed_s", "mem", "world_size", "ranks"}
"""Metrics fields about time, memory and processes: the rest must match between equal runs."""


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit for bit: final adapter, the latest checkpoint's 8-bit optimizer states, and every
    metrics line's numbers."""
    import torch
    from safetensors.torch import load_file

    from qlora.checkpoint import list_checkpoints
    from qlora.logs import read_metrics

    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, theirs = (torch.load(list_checkpoints(d)[-1] / "optimizer.pt", weights_only=True) for d in (run_dir, reference))
    flat = lambda sd: [(k, v) for s in sd["state"].values() for k, v in sorted(s["__bnb_optimizer_quant_state__"].items())]  # noqa: E731
    assert [k for k, _ in flat(ours)] == [k for k, _ in flat(theirs)] and "state1" in dict(flat(ours))
    assert dict(flat(ours))["state1"].dtype == torch.uint8  # the 8-bit path was exercised
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(flat(ours), flat(theirs)))
    numbers = lambda d: [{k: v for k, v in line.items() if k not in NOT_NUMBERS}  # noqa: E731
                         for line in read_metrics(d / "metrics.jsonl")]
    assert numbers(run_dir) == numbers(reference)
