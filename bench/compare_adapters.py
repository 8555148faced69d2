"""Largest difference between two saved adapters (resume tolerance on the GPU).

    python bench/compare_adapters.py RUN_A/final RUN_B/final
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    a, b = (load_file(Path(d) / "adapter_model.safetensors") for d in sys.argv[1:3])
    assert a.keys() == b.keys(), "the adapters hold different weights"
    abs_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    rel_diff = max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)) for k in a)
    identical = all(torch.equal(a[k], b[k]) for k in a)
    print(json.dumps({"tensors": len(a), "bit_identical": identical, "max_abs_diff": abs_diff,
                      "max_rel_norm_diff": rel_diff}))


if __name__ == "__main__":
    main()
