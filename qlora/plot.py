"""Loss and memory per step of a run, as one PNG.

    python -m qlora.plot RUN_DIR [-o RUN_DIR/steps.png]

Needs matplotlib (`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora.errors import UserError, run_cli
from qlora.logs import read_metrics
from qlora.memory import PHASES


def render(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plot]'") from None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}")
    lines = read_metrics(path)
    steps = [r["step"] for r in lines]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(steps, [r["loss"] for r in lines], color="tab:blue")
    top.set_ylabel("loss (per supervised token)")
    top.set_title(str(run_dir))
    mem = [r["mem"] for r in lines]
    if mem[0].get("peak_forward_gib") is not None:
        for phase in PHASES:
            bottom.plot(steps, [m[f"peak_{phase}_gib"] for m in mem], label=f"peak in {phase}")
        bottom.plot(steps, [m["reserved_gib"] for m in mem], label="reserved", linestyle="--")
        bottom.set_ylabel("GPU memory (GiB)")
    else:
        bottom.plot(steps, [m["rss_gib"] for m in mem], label="process RSS")
        bottom.set_ylabel("host memory (GiB)")
    bottom.set_xlabel("optimizer step")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("-o", "--out", type=Path)
    args = p.parse_args(argv)
    return run_cli(lambda a: print(render(a.run_dir, a.out or a.run_dir / "steps.png")), args)


if __name__ == "__main__":
    sys.exit(main())
