"""Where a run's torch.compile time goes: train.py in this process (any arguments it takes), then
torch's own compile-time totals by phase and its counters (graphs, recompiles, cache hits and
misses: inductor's FX graph cache, AOTAutograd's cache and why it bypassed). Run it twice with one
TORCHINDUCTOR_CACHE_DIR to see what a warm cache saves.

    TORCHINDUCTOR_CACHE_DIR=/tmp/cc python bench/compile_times.py --config configs/tiny.yaml \\
        model.compile_layers=true train.max_steps=3 train.output_dir=/tmp/ct --overwrite > times.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch._dynamo.utils as dynamo_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def main() -> int:
    code = train.main(sys.argv[1:])
    phases = dynamo_utils.compile_times(repr="csv", aggregate=True)  # (names, seconds)
    print(json.dumps({"train_exit_code": code,
                      "seconds_by_phase": dict(zip(phases[0], (float(s) for s in phases[1]))),
                      "counters": {k: dict(v) for k, v in dynamo_utils.counters.items() if v}}))
    return code


if __name__ == "__main__":
    sys.exit(main())
