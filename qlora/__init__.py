"""qlora-loop: a QLoRA fine-tuning loop written out in plain PyTorch."""

import os
import sys


def use_expandable_segments() -> None:
    """Let CUDA's caching allocator grow segments in place instead of keeping many fixed-size ones,
    whose gaps made reserved memory run ~40% above allocated on Llama-2-7B (16.1 vs 11.25 GiB).
    Call it before torch allocates on the GPU; an explicit PYTORCH_CUDA_ALLOC_CONF wins."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def quiet_other_ranks() -> None:
    """Under torchrun only global rank 0 prints (hub notices, data report, progress, summary): the
    other ranks' stdout goes to /dev/null from a command's first line on; errors still reach stderr."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")
