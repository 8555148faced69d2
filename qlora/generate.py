"""Greedy answers in batches: the training prompt without its answer, left-padded so every row's
last token sits at the same position, generated with the KV cache, cut at the answer's end token or
the end of the answer line."""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from qlora.data import Example, encode_prompt
from qlora.model import DTYPES
from qlora.prompts import Prompter


def left_pad(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def extract_answer(text: str) -> str:
    """The answer is the first line of the generation."""
    return text.strip().split("\n")[0].strip()


@torch.no_grad()
def generate_answers(model: Any, prompter: Prompter, examples: list[Example], max_length: int,
                     max_new_tokens: int, batch_size: int, precision: str, device: torch.device,
                     progress: bool = True) -> dict[str, tuple[str, str]]:
    """{question id: (answer, raw generation)}. Prompts are sorted by length so a batch pads little;
    a context too long for `max_length - max_new_tokens` keeps its beginning (the answer's place is
    unknown here). Generation stops at the token training ended answers with."""
    tokenizer = prompter.tokenizer
    prompts = {e.id: encode_prompt(e, prompter, max_length - max_new_tokens)[0] for e in examples}
    order = sorted((e.id for e in examples if prompts[e.id] is not None), key=lambda i: len(prompts[i]))
    out = {e.id: ("", "") for e in examples if prompts[e.id] is None}
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch"):
        ids = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in ids], tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=prompter.end_id, pad_token_id=tokenizer.pad_token_id,
                                       use_cache=True)
        new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()  # sync point
        for qid, tokens in zip(ids, new_tokens):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            out[qid] = (extract_answer(text), text)
    return out
