"""Tokenizers built from text, for offline runs and tests (the hub is not reachable there).

Each layout copies how one family's real tokenizer is built, trained with the `tokenizers` library:
- SentencePiece-style ("sentencepiece" = Llama-2, "mistral", "gemma"): BPE over "▁"-marked text with
  byte fallback (<0x00>..<0xFF>), a BOS prepended; Gemma marks no space before the text;
- byte-level BPE ("bytelevel" = GPT-2, "llama3", "llama3-base", "qwen", "qwen3"): Llama-3 prepends
  <|begin_of_text|>, Qwen and GPT-2 nothing;
each with its family's special tokens (chat turn markers, EOS, pad) and, given a template file, its
real chat template (configs/templates/).

    python -m qlora.tiny OUT_DIR --kind sentencepiece --vocab 2000 TEXT_OR_KORQUAD_JSON...
    python -m qlora.tiny OUT_DIR --family qwen3 --vocab 800 configs/tiny/korquad_tiny.json   # a toy Qwen3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qlora.families import FAMILIES, TOY
from qlora.prompts import FORMATS

TEMPLATES = Path(__file__).resolve().parents[1] / "configs" / "templates"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


@dataclass(frozen=True)
class TokenizerLayout:
    sentencepiece: bool
    """SentencePiece-style "▁" pieces with byte fallback; else byte-level BPE."""
    bos: str | None
    eos: str
    pad: str | None = None
    specials: tuple[str, ...] = ()
    """Further special tokens: chat turn markers, the base model's EOS of an instruct tokenizer."""
    added: tuple[str, ...] = ()
    """Added tokens that are text, not control (Qwen3's <think>): decoding keeps them."""
    prefix_space: bool = True
    """SentencePiece only: a "▁" before the text (Llama-2, Mistral), or none (Gemma)."""


LAYOUTS = {
    "sentencepiece": TokenizerLayout(True, "<s>", "</s>"),
    "bytelevel": TokenizerLayout(False, None, "<|endoftext|>"),
    "llama3": TokenizerLayout(False, "<|begin_of_text|>", "<|eot_id|>",
                              specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>")),
    # a base model's tokenizer that ships the chat template: its EOS is not the end of a turn
    "llama3-base": TokenizerLayout(False, "<|begin_of_text|>", "<|end_of_text|>",
                                   specials=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    "qwen": TokenizerLayout(False, None, "<|im_end|>", pad="<|endoftext|>", specials=("<|im_start|>",)),
    "qwen3": TokenizerLayout(False, None, "<|im_end|>", pad="<|endoftext|>", specials=("<|im_start|>",),
                             added=("<think>", "</think>")),
    "mistral": TokenizerLayout(True, "<s>", "</s>", specials=("[INST]", "[/INST]")),
    "gemma": TokenizerLayout(True, "<bos>", "<eos>", pad="<pad>", specials=("<start_of_turn>", "<end_of_turn>"),
                             prefix_space=False),
}


def build_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, limit_alphabet: int | None = None,
                    chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer of the layout `kind` (a LAYOUTS name) on `texts`. `limit_alphabet` caps how
    many distinct characters (beyond ASCII) get their own piece: the rest go through byte fallback,
    as rare Hangul does in Llama-2."""
    layout = LAYOUTS[kind]
    special = [t for t in ("<unk>" if layout.sentencepiece else None, layout.pad, layout.bos, layout.eos,
                           *layout.specials) if t]
    tok = _train(texts, layout, special, vocab_size, limit_alphabet)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in layout.added])
    if layout.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{layout.bos} $A", pair=f"{layout.bos} $A {layout.bos} $B",
            special_tokens=[(layout.bos, tok.token_to_id(layout.bos))])
    names = {"bos_token": layout.bos, "eos_token": layout.eos, "pad_token": layout.pad,
             "unk_token": "<unk>" if layout.sentencepiece else None}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in names.items() if v},
                                  additional_special_tokens=list(layout.specials))
    out.chat_template = chat_template
    return out


def _train(texts: Iterable[str], layout: TokenizerLayout, special: list[str], vocab_size: int,
           limit_alphabet: int | None) -> Tokenizer:
    if layout.sentencepiece:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        marks = [normalizers.Prepend("▁")] if layout.prefix_space else []
        tok.normalizer = normalizers.Sequence([*marks, normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)] if layout.prefix_space else []
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
        # ASCII always gets its own pieces, as in Llama-2; limit_alphabet caps the rest
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special + BYTE_TOKENS,
                                      initial_alphabet=[chr(c) for c in range(32, 127)], show_progress=False,
                                      **({"limit_alphabet": limit_alphabet} if limit_alphabet else {}))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def build_family(name: str, texts: list[str], out: Path, vocab_size: int = 800) -> tuple[Path, Path]:
    """A toy model of a family (qlora/families.py): its tokenizer (layout, special tokens, real chat
    template) in out/tokenizer and its architecture's config.json in out/model, for random_init.
    Returns (model dir, tokenizer dir)."""
    from transformers import AutoConfig

    family = FAMILIES[name]
    template = (TEMPLATES / family.template).read_text(encoding="utf-8")
    tokenizer = build_tokenizer(texts + template_words() * 50, family.tokenizer, vocab_size, chat_template=template)
    tokenizer.save_pretrained(out / "tokenizer")
    config = AutoConfig.for_model(family.model_type, **TOY, **dict(family.toy), vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    config.save_pretrained(out / "model")
    return out / "model", out / "tokenizer"


def template_words() -> list[str]:
    """The prompt formats' own words, so that they do not all fall back to bytes."""
    return [f.render("", "") for f in FORMATS.values()]


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
    p.add_argument("--kind", default="sentencepiece", choices=list(LAYOUTS))
    p.add_argument("--chat-template", type=Path, help="a .jinja file (configs/templates/) to ship with it")
    p.add_argument("--family", choices=list(FAMILIES),
                   help="instead: a toy model of this family, its tokenizer and chat template, in OUT/model "
                        "and OUT/tokenizer (train with model.random_init=true)")
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--limit-alphabet", type=int)
    args = p.parse_args()
    texts = []
    for source in map(Path, args.sources):
        texts += korquad_texts(source) if source.suffix == ".json" else source.read_text().splitlines()
    if args.family:
        model, tokenizer = build_family(args.family, texts, Path(args.out), args.vocab)
        print(f"model.name={model} model.tokenizer={tokenizer} model.random_init=true data.format=chat")
        return
    template = args.chat_template.read_text(encoding="utf-8") if args.chat_template else None
    build_tokenizer(texts + template_words() * 50, args.kind, args.vocab, args.limit_alphabet,
                    template).save_pretrained(args.out)


if __name__ == "__main__":
    main()
