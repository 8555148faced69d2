"""Checkpoints: resume equals an unbroken run bit for bit on CPU, whatever stopped the run, and bad
checkpoints or changed configs are refused. Two runs are killed in a subprocess (a signal needs a
process); every other run, the resumes included, runs in this process through train.main."""

import hashlib
import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

import train
from qlora.checkpoint import list_checkpoints, peft_layout, trainable_weights
from qlora.logs import read_metrics
from tests.conftest import FIXTURE, REFERENCE, ROOT, TINY_YAML, assert_same_run

COMMON = REFERENCE
WAIT_S = 120  # the longest any test waits for a file a subprocess writes


def args(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_YAML), *COMMON, f"train.output_dir={out}", f"model.random_init_cache={cache}",
            *extra]


def start(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *args(out, cache, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(ready, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"gave up after {WAIT_S} s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def cache(reference_run):
    return reference_run[1]


@pytest.fixture(scope="module")
def unbroken(reference_run):
    return reference_run[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache):
    """A finished run with checkpoints at steps 10 and 12. Tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(args(out, cache, "train.save_every=2")) == 0
    return out


def test_sigkill_at_any_moment_then_resume_equals_unbroken_run(tmp_path, cache, unbroken):
    """With a save after every step most of the run is spent saving: the kill lands in or between
    writes; either way the complete checkpoints load and the resumed run matches."""
    out = tmp_path / "run"
    proc = start(out, cache, "train.save_every=1", "train.keep_last=40")
    wait_until(lambda: (out / "checkpoints" / "step-00000004").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "final").exists() and len(read_metrics(out / "metrics.jsonl")) < 12
    # what a kill inside save_checkpoint leaves: a temporary folder with partial files
    partial = out / "checkpoints" / ".tmp-step-00000099"
    partial.mkdir(exist_ok=True)
    (partial / "optimizer.pt").write_bytes(b"\x80\x04partial")
    assert train.main(args(out, cache, "train.save_every=1", "train.keep_last=40", "--resume")) == 0
    assert_same_run(out, unbroken)


def test_sigterm_saves_and_resumes(tmp_path, cache, unbroken, capsys):
    out = tmp_path / "run"
    proc = start(out, cache)
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0
    assert "SIGTERM: stopped after step" in stdout and "--resume" in stdout
    assert "Paged optimizers are not supported on CPU" not in stderr  # bitsandbytes' CPU notice, silenced
    assert not (out / "final").exists() and list_checkpoints(out)
    assert train.main(args(out, cache, "--resume")) == 0
    assert_same_run(out, unbroken)


def test_resume_into_another_output_dir_carries_the_metrics(tmp_path, cache, finished, unbroken, capsys):
    """train.output_dir is an allowed change: the resumed run writes there, its metrics.jsonl
    starting from the checkpoint run's lines up to the checkpoint's step."""
    moved = tmp_path / "new" / "place"
    earlier = list_checkpoints(finished)[0]
    assert train.main(args(moved, cache, "train.save_every=2", "--resume-from", str(earlier))) == 0
    assert [r["step"] for r in read_metrics(moved / "metrics.jsonl")] == list(range(1, 13))
    assert_same_run(moved, unbroken)
    # into a folder that holds another run: refused, that run untouched
    before = (unbroken / "metrics.jsonl").read_text()
    assert train.main(args(unbroken, cache, "train.save_every=2", "--resume-from", str(earlier))) == 2
    assert f"output directory {unbroken} already holds a run" in capsys.readouterr().err
    assert (unbroken / "metrics.jsonl").read_text() == before


def test_resume_from_an_earlier_checkpoint_drops_the_later_ones(finished, cache, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    earlier, later = list_checkpoints(run)
    assert train.main(args(run, cache, "train.save_every=0", "train.max_steps=12", "--resume-from", str(earlier))) == 0
    assert f"resume: removed {later}" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run)] == [earlier.name, "step-00000012"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))


@pytest.mark.parametrize("change, message", [
    ("lora.r=8", "lora.r (64 -> 8)"),
    ("data.max_length=130", "data.max_length (128 -> 130)"),
    ("train.lr=0.5", "train.lr (0.01 -> 0.5)"),
])
def test_incompatible_config_is_refused(finished, cache, change, message, capsys):
    assert train.main(args(finished, cache, "train.save_every=2", change, "--resume")) == 2
    assert f"error: cannot resume: the config differs from the checkpoint's in {message}" in capsys.readouterr().err


def test_a_finished_run_is_not_resumed(finished, cache, capsys):
    assert train.main(args(finished, cache, "train.save_every=2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "nothing to resume: checkpoint" in err and "is at step 12, the run's last step is 12" in err


def test_changed_data_is_refused_and_allowed_changes_are_listed(cache, tmp_path, capsys):
    source = tmp_path / "fixture.json"
    source.write_text(FIXTURE.read_text())
    run = tmp_path / "run"
    assert train.main(args(run, cache, "train.save_every=2", f"data.source={source}")) == 0
    earliest = str(list_checkpoints(run)[0])
    data = json.loads(FIXTURE.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] += " 정확히"
    source.write_text(json.dumps(data, ensure_ascii=False))  # same path, other content: only the fingerprint tells
    assert train.main(args(run, cache, "train.save_every=2", f"data.source={source}", "--resume-from", earliest)) == 2
    assert "the tokenized data differ" in capsys.readouterr().err
    source.write_text(FIXTURE.read_text())
    assert train.main(args(run, cache, f"data.source={source}", "train.progress_bar=true",
                           "model.recompute_layers=1", "--resume-from", earliest)) == 0
    out = capsys.readouterr().out
    assert "resume: allowed change train.save_every: 2 -> 0" in out
    assert "resume: allowed change model.recompute_layers: None -> 1" in out


def test_truncated_and_tampered_checkpoints_are_refused(finished, cache, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    latest = list_checkpoints(run)[-1]
    optimizer = latest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert train.main(args(run, cache, "train.save_every=2", "--resume")) == 2
    assert f"checkpoint {latest}: optimizer.pt does not match its checksum" in capsys.readouterr().err

    # a pickle that would run code, with a matching checksum: weights_only refuses it
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    state = latest / "state.pt"
    torch.save({"x": Evil()}, state, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    meta = json.loads((latest / "meta.json").read_text())
    meta["files"]["state.pt"] = hashlib.sha256(state.read_bytes()).hexdigest()
    meta["files"]["optimizer.pt"] = hashlib.sha256(optimizer.read_bytes()).hexdigest()
    (latest / "meta.json").write_text(json.dumps(meta))
    assert train.main(args(run, cache, "train.save_every=2", "--resume-from", str(latest))) == 2
    captured = capsys.readouterr()
    assert "cannot be loaded" in captured.err and "pwned" not in captured.out

    meta.pop("format")  # what a checkpoint of the version before the key renames holds
    (latest / "meta.json").write_text(json.dumps(meta))
    assert train.main(args(run, cache, "train.save_every=2", "--resume-from", str(latest))) == 2
    assert "written by an earlier version of qlora-loop" in capsys.readouterr().err


def test_non_finite_weights_stop_the_run_without_a_checkpoint(tmp_path, cache, capsys):
    out = tmp_path / "run"
    code = train.main(args(out, cache, "train.lr=1e30", "train.precision=fp32", "train.max_grad_norm=1e30",
                           "train.save_every=1", "train.max_steps=5"))
    assert code == 4
    err = capsys.readouterr().err
    assert "not finite" in err and "stopping without saving a checkpoint" in err
    assert not (out / "final").exists()
    for ckpt in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter_model.safetensors").values())
    assert read_metrics(out / "metrics.jsonl")  # the steps before it stay, for the diagnosis


def test_auto_resume_starts_resumes_and_never_replaces_another_run(cache, tmp_path, capsys):
    """What torchrun --max-restarts repeats: start when there is no checkpoint (replacing only an
    unfinished run of the same config), else continue from the latest."""
    run = tmp_path / "run"
    short = ["train.max_steps=4", "train.save_every=2"]
    assert train.main(args(run, cache, *short, "--auto-resume")) == 0  # a fresh start
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "final")
    (run / "metrics.jsonl").write_text("")  # as if it died before its first checkpoint
    assert train.main(args(run, cache, *short, "--auto-resume")) == 0
    assert len(read_metrics(run / "metrics.jsonl")) == 4
    assert train.main(args(run, cache, *short, "--auto-resume")) == 2  # finished: nothing to resume
    shutil.rmtree(run / "checkpoints")  # a finished run whose checkpoints were deleted: final/ stays
    capsys.readouterr()
    assert train.main(args(run, cache, *short, "--auto-resume")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "final" / "adapter_model.safetensors").exists()
    shutil.rmtree(run / "final")
    assert train.main(args(run, cache, *short, "train.lr=0.5", "--auto-resume")) == 2  # another run's folder
    assert "already holds a run" in capsys.readouterr().err


def test_peft_layout_is_peft_s_own(tiny_model_factory):
    """The adapter file's keys and tensors, written without peft's get_peft_model_state_dict (which
    finds adapter layers by module names that FSDP changes), equal what that function gives."""
    model = tiny_model_factory("fp32", dropout=0.05)
    ours, peft_s = peft_layout(trainable_weights(model)), get_peft_model_state_dict(model)
    assert list(ours) == list(peft_s) and all(torch.equal(ours[k], peft_s[k]) for k in peft_s)


def test_a_flat_optimizer_checkpoint_resumes_into_per_adapter_states(unbroken, cache):
    """The reference run's checkpoint (its adapters' 8-bit states one flat tensor) restored through
    its files and Start.restore into an optimizer that steps the adapters one by one, model.shard's
    layout: each adapter's states are its slice of the flat ones, each in its own memory."""
    from qlora.checkpoint import Start, load_checkpoint
    from qlora.config import load_config
    from qlora.model import build_model
    from qlora.optim import BNB_STATE, build_training_state

    cpu = torch.device("cpu")
    ckpt = load_checkpoint(list_checkpoints(unbroken)[0], cpu)
    (flat,) = ckpt.optimizer["state"].values()
    saved = {key: flat[BNB_STATE][key].clone() for key in ("state1", "state2", "absmax1", "absmax2")}
    cfg = load_config(TINY_YAML, [*COMMON, f"model.random_init_cache={cache}"])
    model = build_model(cfg.model, cfg.lora, cfg.train.precision, cpu, cfg.train.seed)
    start = Start.from_checkpoint(ckpt)
    start.restore_adapter(model)
    state = build_training_state(model, cfg.train, 12, cpu, flat=False)
    start.restore(model, state)
    per_adapter = [state.optimizer.state[p] for p in state.adapters]
    for key, value in saved.items():
        assert torch.equal(torch.cat([s[key].reshape(-1) for s in per_adapter]), value.reshape(-1))
    assert all(s["state1"].shape == p.shape and s["step"] == 4 for s, p in zip(per_adapter, state.adapters))
    assert len({s["state1"].untyped_storage().data_ptr() for s in per_adapter}) == len(per_adapter)
    released = start.released()  # what train.py keeps for the loop: no second copy of the states
    assert (released.step, released.checkpoint.adapter, released.checkpoint.optimizer) == (4, {}, {})
