"""A stand-in for the Llama-2 tokenizer, for GPU runs on a machine that cannot reach the hub.

Llama-2's tokenizer spends ~1.5 tokens per Korean character (most Hangul falls back to 3 byte
pieces). Speed and memory depend on sequence lengths, not on which ids they hold, so this script
trains a tokenizer of Llama-2's layout (SentencePiece-style BPE, byte fallback, <s> and </s>) with
an alphabet small enough that KorQuAD's token lengths match the ones measured with Llama-2
(../shared/data/README.md), and prints both side by side. The output is derived from the dev file:
keep it in a git-ignored folder, never commit it.

    python bench/standin_tokenizer.py ../shared/data/KorQuAD_v1.0_dev.json .devdata/tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlora.data import load_examples, percentiles
from qlora.prompts import FORMATS
from qlora.tiny import build_tokenizer, korquad_texts, template_words

# measured with the real Llama-2 tokenizer on the dev file (../shared/data/README.md)
LLAMA2 = {"closed_book": {"mean": 89, "p50": 87, "p90": 115, "p99": 148, "max": 224},
          "context+question+answer": {"mean": 865, "p50": 751, "p90": 1193, "p99": 2870, "max": 4240}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dev_file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--vocab", type=int, default=600)
    p.add_argument("--alphabet", type=int, default=140)
    args = p.parse_args()
    # the templates' words repeated, so they merge into few pieces as in Llama-2's English vocab
    texts = korquad_texts(args.dev_file) + template_words() * 50
    tok = build_tokenizer(texts, "sentencepiece", args.vocab, args.alphabet)
    tok.save_pretrained(args.out)
    examples = load_examples(str(args.dev_file))
    measured = {
        "closed_book": [len(tok(FORMATS["closed_book"].render(e.question, "") + " " + e.answer).input_ids) for e in examples],
        "context+question+answer": [len(tok(f"{e.context} {e.question} {e.answer}").input_ids) for e in examples],
    }
    for name, lengths in measured.items():
        print(f"{name:>24}: stand-in {percentiles(lengths)}\n{'':>24}  Llama-2  {LLAMA2[name]}")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
