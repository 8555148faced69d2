"""Memory audit on CPU: the fields users read, the breakdown's arithmetic, the estimate's
arithmetic, OOM handling, the picture."""

import json

import pytest
import torch

import train
from qlora import loop, plot
from qlora.checkpoint import list_checkpoints
from qlora.logs import read_metrics
from qlora.memory import PHASES, startup_breakdown
from tests.conftest import TINY_YAML

CUDA_FIELDS = ["allocated_gib", "reserved_gib", *[f"peak_{p}_gib" for p in PHASES], "peak_active_gib",
               "peak_reserved_gib", "alloc_retries", "ooms"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "run"
    cache = tmp_path_factory.mktemp("cache")
    assert train.main(["--config", str(TINY_YAML), f"train.output_dir={out}", f"model.random_init_cache={cache}",
                       "train.max_steps=6", "train.save_every=3", "train.progress_bar=false", "--estimate-memory"]) == 0
    return out, cache


def test_every_step_has_memory_fields(short_run):
    out, _ = short_run
    for line in read_metrics(out / "metrics.jsonl"):
        mem = line["mem"]
        assert 0 < mem["rss_gib"] <= mem["peak_rss_gib"]
        assert all(mem[k] is None for k in CUDA_FIELDS)  # CPU: no allocator to read


def test_breakdown_is_written_and_adds_up(short_run, tiny_model_factory):
    out, _ = short_run
    saved = json.loads((out / "memory.json").read_text())
    assert saved["device"] == "cpu" and saved["rss"] > 0
    model = tiny_model_factory("fp16")
    lora_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert saved["bytes"]["lora_adapters"] == lora_bytes  # fp32 adapters
    # AdamW keeps two fp32 states per weight for tensors under bitsandbytes' 8-bit threshold
    assert saved["bytes"]["optimizer_state_device"] == 2 * lora_bytes
    assert saved["bytes"]["optimizer_state_paged"] == 0
    # base: 4-bit weights (2 per byte) + their quantization constants + fp32 embeddings/norms/head
    quantized = sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    others = sum(p.numel() * p.element_size() for p in model.parameters()
                 if p.dtype != torch.uint8 and not p.requires_grad)
    # plus small extras: absmax per 64-weight block, 256-entry codebooks, rotary buffers
    assert 0 < saved["bytes"]["base_weights"] - (others + quantized) < 64 * 1024
    again = startup_breakdown(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]),
                              torch.device("cpu"))
    assert again["bytes"]["base_weights"] == saved["bytes"]["base_weights"]


def test_oom_in_a_step_exits_3_with_the_knobs_and_keeps_checkpoints(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = loop.micro_batch_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8:  # steps 1-4 run (2 micro-batches each), step 5 fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "micro_batch_loss", failing)
    code = train.main(["--config", str(TINY_YAML), f"train.output_dir={out}", "train.max_steps=10",
                       "train.save_every=2", "train.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 3
    assert "out of memory in step 5" in err and "train.batch_size" in err and "data.max_length" in err
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert train.main(["--config", str(TINY_YAML), f"train.output_dir={out}", "train.max_steps=10",
                       "train.save_every=2", "train.progress_bar=false", "--resume"]) == 3  # still failing
    monkeypatch.setattr(loop, "micro_batch_loss", real)
    assert train.main(["--config", str(TINY_YAML), f"train.output_dir={out}", "train.max_steps=10",
                       "train.save_every=2", "train.progress_bar=false", "--resume"]) == 0


def test_png_renders_from_a_run_into_a_new_folder(short_run, tmp_path, capsys):
    out, _ = short_run
    png = tmp_path / "plots" / "of" / "steps.png"
    assert plot.main([str(out), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot.main([str(tmp_path)]) == 2 and f"no metrics.jsonl in {tmp_path}" in capsys.readouterr().err
