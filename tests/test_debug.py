"""The README's debugger recipe, read from README.md and fed to pdb, and --break-at: the run stops
inside the training step with the step's objects in scope, and the README's expressions evaluate
there."""

import re
import shlex
import subprocess
import sys

import pytest

import train
from tests.conftest import ROOT, TINY_YAML

README = (ROOT / "README.md").read_text(encoding="utf-8")
SECTION = README[README.index("## Stepping through it in a debugger"):]
SECTION = SECTION[:SECTION.index("\n## ", 1)]
BLOCKS = re.findall(r"```(?:bash|text)\n(.*?)```", SECTION, re.S)
STOPS: list[dict] = []


def stop_here() -> None:
    """What PYTHONBREAKPOINT calls instead of pdb: records, at the stop, where it is, which
    gradients exist, and what each of the README's expressions gives there."""
    frame = sys._getframe(1)
    model = frame.f_locals["model"]
    STOPS.append({"function": frame.f_code.co_name, "file": frame.f_code.co_filename,
                  "step": frame.f_locals["step"],
                  "grads": [p.grad is not None for p in model.parameters() if p.requires_grad],
                  "expressions": {e: evaluate(e, frame) for e in expressions("end")}})


def evaluate(expression: str, frame) -> str:
    try:
        eval(expression, frame.f_globals, frame.f_locals)
        return "ok"
    except Exception as e:  # noqa: BLE001 (reported by the test, per expression)
        return f"{type(e).__name__}: {e}"


def test_the_readme_pdb_recipe_stops_inside_the_training_step(tiny_run, tmp_path):
    command, *pdb_lines = [line for line in BLOCKS[0].splitlines() if line.strip()]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pdb"] and all(line.startswith("(Pdb) ") for line in pdb_lines)
    _, cache = tiny_run
    typed = [line.removeprefix("(Pdb) ") for line in pdb_lines] + ["p 'STOPPED', step", "quit"]
    result = subprocess.run([sys.executable, *argv[1:], f"train.output_dir={tmp_path / 'run'}",
                             f"model.random_init_cache={cache}"],
                            input="\n".join(typed) + "\n", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert re.search(r"> .*qlora/loop\.py\(\d+\)train_step\(\)", result.stdout), result.stdout[-2000:]
    assert "('STOPPED', 1)" in result.stdout


def expressions(phase: str) -> list[str]:
    """The README's `(Pdb) p ...` lines that hold at `phase` (lines marked "# at end" need it)."""
    lines = [line for block in BLOCKS[1:] for line in block.splitlines() if line.startswith("(Pdb) p ")]
    assert len(lines) >= 5
    return [line.removeprefix("(Pdb) p ").split("  #")[0].strip() for line in lines
            if phase == "end" or "# at end" not in line]


@pytest.mark.parametrize("phase", ["window", "optimizer", "end"])
def test_break_at_stops_in_the_step_and_phase_asked_for(tiny_run, tmp_path, monkeypatch, phase):
    _, cache = tiny_run
    STOPS.clear()
    monkeypatch.setenv("PYTHONBREAKPOINT", f"{__name__}.stop_here")
    assert train.main(["--config", str(TINY_YAML), f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                       f"model.random_init_cache={cache}", "train.progress_bar=false", "--break-at",
                       f"2:{phase}"]) == 0
    (stop,) = STOPS
    assert stop["function"] == "train_step" and stop["file"].endswith("loop.py") and stop["step"] == 2
    # accumulated over the window and not yet stepped; else freed by zero_grad(set_to_none=True)
    assert set(stop["grads"]) == {phase == "optimizer"}
    results = {e: stop["expressions"][e] for e in expressions(phase)}  # every README expression, as typed
    assert set(results.values()) == {"ok"}, results
