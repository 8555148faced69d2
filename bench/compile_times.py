"""Where a run's torch.compile time goes: train.py in this process (any arguments it takes), then
torch's own compile-time totals by phase and its counters (graphs, recompiles, cache hits and
misses: inductor's FX graph cache, AOTAutograd's cache and how often it was bypassed), as JSON into
--out. Run it twice with one TORCHINDUCTOR_CACHE_DIR to see what a warm cache saves.

    TORCHINDUCTOR_CACHE_DIR=/tmp/cc python bench/compile_times.py --out cold.json --config configs/tiny.yaml \\
        model.compile_layers=true train.max_steps=3 train.output_dir=/tmp/ct --overwrite
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    args, rest = p.parse_known_args()
    code = train.main(rest)
    import torch._dynamo.utils as dynamo_utils  # train.py loaded torch (after its config checks)

    names, seconds = dynamo_utils.compile_times(repr="csv", aggregate=True)
    args.out.write_text(json.dumps({
        "train_exit_code": code, "seconds_by_phase": dict(zip(names, map(float, seconds))),
        "counters": {k: dict(v) for k, v in dynamo_utils.counters.items() if v}}, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
