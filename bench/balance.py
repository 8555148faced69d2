"""How evenly a step's packed rows split over N ranks, from the data order alone (CPU, no model):
mean over steps of (even share of the step's tokens) / (busiest rank's tokens), and rows per step,
with data.pack_rows_multiple 1 (as few rows as fit) and M.

    python bench/balance.py --config configs/llama2-7b-korquad.yaml --ranks 2 --multiple 2 --steps 100 \
        model.tokenizer=DIR data.source=KorQuAD_v1.0_dev.json train.grad_accum=8
"""

from __future__ import annotations

import argparse
import json

from qlora.batching import data_order
from qlora.config import load_config
from qlora.data import prepare_data
from qlora.distributed import World, share
from qlora.model import load_tokenizer
from qlora.prompts import build_prompter


def balance(order, ranks: int, steps: int, skip: int) -> tuple[float, float]:
    busiest = even = rows = 0.0
    for step in range(skip, steps):
        _, batches = order.batches(step)
        loads = [sum(b["n_tokens"] for b in share(batches, World(rank=r, size=ranks))) for r in range(ranks)]
        busiest, even, rows = busiest + max(loads), even + sum(loads) / ranks, rows + len(batches)
    return even / busiest, rows / (steps - skip)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--ranks", type=int, required=True)
    p.add_argument("--multiple", type=int, required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=int, default=0, help="leave out the first steps (as the timed GPU runs do)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if not 0 <= args.skip < args.steps:
        p.error("--skip must be in [0, --steps)")
    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, build_prompter(tokenizer, cfg.data.format, cfg.data.chat_template_kwargs),
                        cfg.train.seed)
    for multiple in (1, args.multiple):
        cfg = load_config(args.config, [*args.overrides, f"data.pack_rows_multiple={multiple}"])
        even, rows = balance(data_order(data.rows, cfg.data, cfg.train, tokenizer.pad_token_id), args.ranks, args.steps,
                             args.skip)
        print(json.dumps({"ranks": args.ranks, "pack_rows_multiple": multiple, "grad_accum": cfg.train.grad_accum,
                          "steps": f"{args.skip + 1}-{args.steps}", "balance": round(even, 3), "rows_per_step": round(rows, 2)}))


if __name__ == "__main__":
    main()
