"""Checkpoints: resume equals an unbroken run bit for bit on CPU, whatever kills the run, and bad
checkpoints or changed configs are refused."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.checkpoint import list_checkpoints
from qlora.logs import read_metrics
from tests.conftest import FIXTURE, ROOT, TINY_YAML

# r=64 makes each LoRA matrix 4,096 elements, the size from which bitsandbytes keeps 8-bit
# optimizer states; dropout stays on, so the RNG states must be restored too.
COMMON = ["lora.r=64", "train.max_steps=40", "log.progress=false"]
TIMING = {"tokens_per_s", "step_s", "elapsed_s", "mem"}


def cmd(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--config", str(TINY_YAML), *COMMON,
            f"train.output_dir={out}", f"model.random_init_cache={cache}", *extra]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)


def numbers(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("unbroken") / "run"
    result = run(cmd(out, cache))
    assert result.returncode == 0, result.stderr
    return out


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = load_file(run_dir / "final" / "adapter_model.safetensors"), load_file(
        reference / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, theirs = (torch.load(list_checkpoints(d)[-1] / "optimizer.pt", weights_only=True) for d in (run_dir, reference))
    flat = lambda sd: [(k, v) for s in sd["state"].values() for k, v in sorted(s["__bnb_optimizer_quant_state__"].items())]  # noqa: E731
    assert [k for k, _ in flat(ours)] == [k for k, _ in flat(theirs)] and "state1" in dict(flat(ours))
    assert dict(flat(ours))["state1"].dtype == torch.uint8  # the 8-bit path was exercised
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(flat(ours), flat(theirs)))
    assert numbers(read_metrics(run_dir / "metrics.jsonl")) == numbers(read_metrics(reference / "metrics.jsonl"))


def test_resume_after_sigkill_equals_unbroken_run(tmp_path, cache, unbroken):
    out = tmp_path / "run"
    proc = start(cmd(out, cache, "train.save_every=3"))
    wait_for(out / "checkpoints" / "step-00000003", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert len(read_metrics(out / "metrics.jsonl")) < 40
    result = run(cmd(out, cache, "train.save_every=3", "--resume"))
    assert result.returncode == 0, result.stderr
    assert_same_run(out, unbroken)


def test_kill_while_writing_a_checkpoint_leaves_earlier_ones_intact(tmp_path, cache, unbroken):
    """With a save after every step, most of the run is spent saving: the kill lands in or
    between writes; either way the complete checkpoints load and the resume matches."""
    out = tmp_path / "run"
    proc = start(cmd(out, cache, "train.save_every=1", "train.keep_last=40"))
    wait_for(out / "checkpoints" / "step-00000004", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # what a kill inside save_checkpoint leaves: a temporary folder with partial files
    partial = out / "checkpoints" / ".tmp-step-00000099"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"\x80\x04partial")
    result = run(cmd(out, cache, "train.save_every=1", "train.keep_last=40", "--resume"))
    assert result.returncode == 0, result.stderr
    assert_same_run(out, unbroken)


def test_sigterm_saves_and_resumes(tmp_path, cache, unbroken):
    out = tmp_path / "run"
    proc = start(cmd(out, cache))
    wait_for(out / "metrics.jsonl", proc)
    while len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate()
    assert proc.returncode == 0
    assert "SIGTERM: stopped after step" in stdout and "--resume" in stdout
    assert not (out / "final").exists() and list_checkpoints(out)
    result = run(cmd(out, cache, "--resume"))
    assert result.returncode == 0, result.stderr
    assert_same_run(out, unbroken)


@pytest.fixture()
def stopped(tmp_path, cache):
    out = tmp_path / "run"
    result = run(cmd(out, cache, "train.max_steps=40", "train.save_every=2"))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("change, message", [
    ("lora.r=8", "lora.r (64 -> 8)"),
    ("data.max_length=130", "data.max_length (128 -> 130)"),
    ("train.lr=0.5", "train.lr (0.01 -> 0.5)"),
])
def test_incompatible_config_is_refused(stopped, cache, change, message):
    result = run(cmd(stopped, cache, change, "--resume"))
    assert result.returncode == 2
    assert f"error: cannot resume: the config differs from the checkpoint's in {message}" in result.stderr


def test_changed_data_is_refused_and_harmless_changes_are_listed(stopped, cache, tmp_path):
    data = json.loads(FIXTURE.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] += " 정확히"
    # same path, other content: the config alone cannot tell
    original = FIXTURE.read_text()
    copy = tmp_path / "fixture.json"
    copy.write_text(original)
    base = run(cmd(stopped.parent / "b", cache, f"data.source={copy}", "train.save_every=2"))
    assert base.returncode == 0, base.stderr
    copy.write_text(json.dumps(data, ensure_ascii=False))
    result = run(cmd(stopped.parent / "b", cache, f"data.source={copy}", "--resume"))
    assert result.returncode == 2 and "the tokenized data differ" in result.stderr
    copy.write_text(original)
    result = run(cmd(stopped.parent / "b", cache, f"data.source={copy}", "log.progress=true",
                     "model.checkpoint_layers=1", "--resume", str(list_checkpoints(stopped.parent / "b")[0])))
    assert result.returncode == 0, result.stderr
    assert "resume: allowed change train.save_every: 2 -> 0" in result.stdout
    assert "resume: allowed change model.checkpoint_layers: None -> 1" in result.stdout


def test_truncated_and_tampered_checkpoints_are_refused(stopped, cache):
    latest = list_checkpoints(stopped)[-1]
    optimizer = latest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    result = run(cmd(stopped, cache, "--resume"))
    assert result.returncode == 2
    assert f"checkpoint {latest}: optimizer.pt does not match its checksum" in result.stderr

    # a pickle that would run code, with a matching checksum: weights_only refuses it
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    import hashlib
    import pickle
    state = latest / "state.pt"
    torch.save({"x": Evil()}, state, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    meta = json.loads((latest / "meta.json").read_text())
    meta["files"]["state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    meta["files"]["optimizer.pt"] = hashlib.sha256(optimizer.read_bytes()).hexdigest()
    (latest / "meta.json").write_text(json.dumps(meta))
    result = run(cmd(stopped, cache, "--resume", str(latest)))
    assert result.returncode == 2 and "cannot be loaded" in result.stderr
    assert "pwned" not in result.stdout


def test_non_finite_weights_are_never_saved(tmp_path, cache):
    out = tmp_path / "run"
    result = run(cmd(out, cache, "train.lr=1e30", "train.precision=fp32", "train.max_grad_norm=1e30",
                     "train.save_every=1", "train.max_steps=5"))
    assert result.returncode == 4
    assert "not finite" in result.stderr and "stopping without saving" in result.stderr
    for ckpt in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter_model.safetensors").values())
