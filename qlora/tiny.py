"""Tokenizers built from text, for offline runs and tests (the hub is not reachable there).

Two families, both trained with the `tokenizers` library:
- "sentencepiece": Llama-2's layout: BPE over "▁"-marked text with byte fallback (<0x00>..<0xFF>),
  <s> prepended, </s> as EOS;
- "bytelevel": GPT-2's layout: byte-level BPE, no BOS, <|endoftext|> as EOS.

    python -m qlora.tiny OUT_DIR --kind sentencepiece --vocab 2000 TEXT_OR_KORQUAD_JSON...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qlora.prompts import TEMPLATES, render_prompt

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_tokenizer(texts: Iterable[str], kind: str, vocab_size: int,
                    limit_alphabet: int | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer of the given family on `texts`. `limit_alphabet` caps how many distinct
    characters (beyond ASCII) get their own piece: the rest go through byte fallback, as rare
    Hangul does in Llama-2."""
    if kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        special = ["<unk>", "<s>", "</s>"]
        # ASCII always gets its own pieces, as in Llama-2; limit_alphabet caps the rest
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special + BYTE_TOKENS,
                                      initial_alphabet=[chr(c) for c in range(32, 127)],
                                      show_progress=False, **({"limit_alphabet": limit_alphabet} if limit_alphabet else {}))
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    raise ValueError(f"unknown tokenizer kind {kind!r} (allowed: sentencepiece, bytelevel)")


def korquad_texts(path: Path) -> list[str]:
    """Every context, question and answer of a KorQuAD-layout JSON file."""
    texts = []
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            texts.extend(qa["question"] for qa in paragraph["qas"])
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("sources", nargs="+", help="KorQuAD-layout JSON files or plain text files")
    p.add_argument("--kind", default="sentencepiece", choices=["sentencepiece", "bytelevel"])
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--limit-alphabet", type=int)
    args = p.parse_args()
    # The prompt templates' own words, so that they do not all fall back to bytes.
    texts = [render_prompt(fmt, "", "") for fmt in TEMPLATES] * 50
    for source in map(Path, args.sources):
        texts += korquad_texts(source) if source.suffix == ".json" else source.read_text().splitlines()
    build_tokenizer(texts, args.kind, args.vocab, args.limit_alphabet).save_pretrained(args.out)


if __name__ == "__main__":
    main()
