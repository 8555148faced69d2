"""One line of the many-GPU scaling table from a run's metrics.jsonl: tokens/s over the steps after
the first two (compile, warm-up), tokens per step, each rank's peak reserved memory, the losses.

    python bench/scaling.py RUN/metrics.jsonl NAME >> scaling.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qlora.logs import read_metrics


def rank_peaks(line: dict) -> dict[int, float]:
    """{rank: peak reserved GiB} of one metrics line (one process: its own `mem`)."""
    ranks = line.get("ranks") or [{"rank": 0, "peak_reserved_gib": line["mem"]["peak_reserved_gib"]}]
    return {r["rank"]: r["peak_reserved_gib"] for r in ranks}


def main() -> None:
    lines, name = read_metrics(Path(sys.argv[1])), sys.argv[2]
    timed = lines[2:]
    peaks = [rank_peaks(line) for line in lines]
    print(json.dumps({
        "run": name, "world_size": lines[0].get("world_size", 1), "steps_timed": len(timed),
        "tokens_per_s": sum(line["tokens"] for line in timed) / sum(line["step_s"] for line in timed),
        "s_per_step": sum(line["step_s"] for line in timed) / len(timed),
        "tokens_per_step": sum(line["tokens"] for line in timed) / len(timed),
        "peak_reserved_gib_by_rank": [max(p[rank] for p in peaks) for rank in sorted(peaks[-1])],
        "losses": [line["loss"] for line in lines]}))


if __name__ == "__main__":
    main()
