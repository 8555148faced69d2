"""The loss gap between two runs' metrics.jsonl, step by step over the steps both ran: the largest
relative difference, and each step's pair.

    python bench/compare_losses.py REFERENCE/metrics.jsonl OTHER/metrics.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora.logs import read_metrics


def main() -> None:
    reference, other = ({line["step"]: line["loss"] for line in read_metrics(Path(p))} for p in sys.argv[1:3])
    steps = sorted(reference.keys() & other.keys())
    print(json.dumps({"reference": sys.argv[1], "other": sys.argv[2], "steps": [steps[0], steps[-1]],
                      "max_relative_gap": max(abs(other[s] / reference[s] - 1) for s in steps),
                      "losses": [[s, reference[s], other[s]] for s in steps]}))


if __name__ == "__main__":
    main()
