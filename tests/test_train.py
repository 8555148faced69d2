"""train.py as a new user meets it: the first run, its summary and files, and every mistake a user
can make answered with one line, a non-zero exit and nothing lost."""

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

METRIC_KEYS = {"step", "epoch", "world_size", "loss", "lr", "grad_norm", "loss_scale", "skipped", "skipped_total", "tokens",
               "supervised_tokens", "tokens_per_s", "step_s", "elapsed_s", "mem"}


def test_loss_falls_and_every_step_is_logged(tiny_run):
    out, _ = tiny_run
    lines = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1)) and len(lines) == 120
    assert all(set(r) == METRIC_KEYS for r in lines)
    first = sum(r["loss"] for r in lines[:5]) / 5
    last = sum(r["loss"] for r in lines[-5:]) / 5
    assert last < first / 4, (first, last)
    assert lines[0]["lr"] == 0 and lines[-1]["lr"] < lines[10]["lr"]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["output_dir"] == str(out)


def test_readme_documents_every_metrics_key(tiny_run):
    out, _ = tiny_run
    readme = (ROOT / "README.md").read_text()
    record = read_metrics(out / "metrics.jsonl")[0]
    missing = [k for k in [*record, *record["mem"]] if f"`{k}`" not in readme]
    assert not missing, f"README does not explain {missing}"


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


def test_a_run_ends_with_a_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--config", str(TINY_YAML), f"train.output_dir={out}", "train.max_steps=3",
                       f"model.random_init_cache={tmp_path / 'cache'}", "train.progress_bar=false",
                       "--estimate-memory", "--memory-snapshot", "2"]) == 0
    printed = capsys.readouterr().out
    assert "done: step 3; 3 steps in " in printed and " tokens/s" in printed
    assert "memory: peak RSS " in printed
    # the CUDA-only parts say so on a CPU
    assert "(measured only on CUDA)" in printed and "--memory-snapshot records CUDA allocations" in printed
    assert f"metrics: {out / 'metrics.jsonl'}" in printed and f"adapter, tokenizer and config: {out / 'final'}" in printed


def test_overwrite_replaces_the_run_and_keeps_what_other_commands_wrote(tiny_run, tmp_path, capsys):
    out, cache = tiny_run
    run = tmp_path / "run"
    common = ["--config", str(TINY_YAML), f"train.output_dir={run}", f"model.random_init_cache={cache}",
              "train.max_steps=2", "train.progress_bar=false"]
    assert train.main(common) == 0
    for other in ("eval", "base", "merged"):
        (run / other).mkdir()
        (run / other / "predictions.json").write_text("{}")
    (run / "steps.png").write_bytes(b"png")
    assert train.main(common) == 2
    assert f"output directory {run} already holds a run (config.yaml, metrics.jsonl" in capsys.readouterr().err
    assert train.main([*common, "--overwrite", "train.max_steps=1"]) == 0
    assert len(read_metrics(run / "metrics.jsonl")) == 1
    assert all((run / other / "predictions.json").exists() for other in ("eval", "base", "merged"))
    assert (run / "steps.png").read_bytes() == b"png"


def test_inspect_data_prints_the_report_and_examples(capsys):
    assert train.main(["--config", str(TINY_YAML), "--inspect-data", "3", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert len(rows) == 3 and set(rows[0]) == {"id", "prompt", "target", "n_tokens", "n_supervised", "truncated"}
    assert rows[0]["target"].endswith("</s>") and "### Response:" in rows[0]["prompt"]
    assert "data: 24 read, 24 selected, 24 kept" in captured.err  # stdout stays JSON
    assert train.main(["--config", str(TINY_YAML), "--inspect-data", "1"]) == 0
    assert "data: 24 read" in capsys.readouterr().out


def test_dry_run_checks_everything_but_loads_no_model(tmp_path, capsys):
    code = train.main(["--config", str(TINY_YAML), f"train.output_dir={tmp_path / 'run'}", "--dry-run",
                       "--estimate-memory", "model.random_init_cache=/nonexistent/never-written"])
    printed = capsys.readouterr().out
    assert code == 0 and "estimated peak allocated:" in printed and "quantized_weights" in printed
    assert "dry run: steps 1-120 of 4 x 2 examples on 1 x cpu" in printed
    assert not (tmp_path / "run").exists()


def test_help_config_errors_and_scoring_answer_before_torch_loads():
    code = ("import sys, train, evaluate\n"
            "assert train.main(['--config', 'configs/tiny.yaml', 'train.lr=inf']) == 2\n"
            "assert evaluate.main(['--score', 'missing.json', '--data', 'configs/tiny/korquad_tiny.json']) == 2\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train.lr: must be a finite number, got inf" in result.stderr
    assert "error: predictions file not found: missing.json" in result.stderr
    assert subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                          timeout=120).returncode == 0


@pytest.mark.parametrize("override, message", [
    ("data.source=missing.json", "error: data file not found: missing.json"),
    ("model.name=no/such/model", "error: cannot read the architecture of 'no/such/model'"),
    ("train.precision=fp12", "error: invalid config: train.precision: 'fp12' is not allowed"),
    ("train.lr=inf", "error: invalid config: train.lr: must be a finite number"),
])
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, override, message, capsys):
    code = train.main(["--config", str(TINY_YAML), override, f"train.output_dir={tmp_path / 'out'}",
                       "train.progress_bar=false"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(message), errors
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_is_noticed_at_once(tmp_path, monkeypatch, capsys):
    """huggingface_hub would retry for about 50 s; the probe switches to the local cache instead."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if "datasets.config" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets.config"], "HF_HUB_OFFLINE", sys.modules["datasets.config"].HF_HUB_OFFLINE)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    code = train.main(["--config", str(TINY_YAML), "model.tokenizer=no-such-owner/no-such-model", "--dry-run",
                       f"train.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "hub: 127.0.0.1 cannot be reached" in err
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # so no request was retried
    assert "error: cannot load tokenizer 'no-such-owner/no-such-model'" in err


def test_mistakes_with_files_and_flags(tmp_path, capsys):
    base = ["--config", str(TINY_YAML), "train.progress_bar=false"]
    binary = tmp_path / "data.json"
    binary.write_bytes(bytes(range(256)) * 4)
    cases = [
        ([f"data.source={binary}"], f"error: data file {binary} is not UTF-8 text"),
        ([f"train.output_dir={binary}"], f"error: train.output_dir {binary} is a file, not a directory"),
        # an override after --resume is an override, not the checkpoint's path
        (["--resume", f"train.output_dir={tmp_path / 'elsewhere'}"],
         f"error: no checkpoint to resume in {tmp_path / 'elsewhere' / 'checkpoints'}"),
        (["--resume-from", str(tmp_path)], f"error: checkpoint not found: {tmp_path} (expected a folder with meta.json"),
        (["--break-at", "500", f"train.output_dir={tmp_path / 'b'}"],
         "error: --break-at step 500 is not among the steps this run will take (1-120)"),
    ]
    for extra, message in cases:
        assert train.main([*base, *extra]) == 2, extra
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), (extra, errors)
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "b").exists()
