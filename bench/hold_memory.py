"""Hold every visible GPU's memory but FREE GiB, as another process would, until killed: how
`train.memory_budget_gib=auto` is checked on a large GPU as if it were a small one.

    python bench/hold_memory.py FREE_GIB &      # prints one line per GPU once it holds the memory
"""

from __future__ import annotations

import sys
import time

import torch

GIB = 2**30


def main() -> None:
    keep = float(sys.argv[1]) * GIB
    held = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)  # after this process's context on GPU i
        held.append(torch.empty(int(free - keep), dtype=torch.uint8, device=f"cuda:{i}"))
        free, _ = torch.cuda.mem_get_info(i)
        print(f"hold: cuda:{i} {free / GIB:.2f} of {total / GIB:.2f} GiB free", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
