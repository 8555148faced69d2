"""train.py end to end on configs/tiny.yaml: the run a new user makes first."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import train
from qlora.logs import read_metrics
from tests.conftest import ROOT, TINY_YAML

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "loss_scale", "skipped", "tokens", "tokens_per_s",
               "elapsed_s", "mem"}


def test_loss_falls_and_every_step_is_logged(tiny_run):
    out, _ = tiny_run
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1)) and len(lines) == 120
    assert all(METRIC_KEYS <= set(r) for r in lines)
    first = sum(r["loss"] for r in lines[:5]) / 5
    last = sum(r["loss"] for r in lines[-5:]) / 5
    assert last < first / 4, (first, last)
    assert lines[0]["lr"] == 0 and lines[-1]["lr"] < lines[10]["lr"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["output_dir"] == str(out)


def test_adapter_loads_back_with_peft(tiny_run):
    out, cache = tiny_run
    final = out / "final"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml"} <= {
        p.name for p in final.iterdir()}
    (base_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, final)
    saved = load_file(final / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(saved) == len(loaded) == 2 * 4 * 2  # A and B x 4 modules x 2 layers
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n)  # B starts at zero
    for name, tensor in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].detach(), tensor)


def test_refuses_non_empty_output_dir(tiny_run, capsys):
    out, cache = tiny_run
    code = train.main(["--config", str(TINY_YAML), f"train.output_dir={out}", f"model.random_init_cache={cache}"])
    assert code == 2
    assert f"output directory {out} is not empty (pass --overwrite" in capsys.readouterr().err


def test_inspect_data_json(capsys):
    assert train.main(["--config", str(TINY_YAML), "--inspect-data", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "target", "n_tokens", "n_supervised", "truncated"}
    assert rows[0]["target"].endswith("</s>") and "### Response:" in rows[0]["prompt"]


@pytest.mark.parametrize("override, message", [
    ("data.source=missing.json", "error: data file not found: missing.json"),
    ("model.name=no/such/model", "error: cannot read the architecture of 'no/such/model'"),
    ("train.precision=fp12", "error: invalid config: train.precision: 'fp12' is not allowed"),
])
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, override, message):
    result = subprocess.run([sys.executable, "train.py", "--config", str(TINY_YAML), override,
                             f"train.output_dir={tmp_path / 'out'}", "log.progress=false"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
