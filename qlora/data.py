"""KorQuAD in, token ids and labels out: loading, selection, prompt + answer tokenization, label
masking, and cutting long contexts around the answer.

Label masking lives in `encode_example`: prompt tokens get IGNORE, the answer and the token that
ends it (EOS, or the chat template's end of turn: qlora/prompts.py) are learned.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.config import DataConfig
from qlora.errors import UserError
from qlora.prompts import Prompter

IGNORE = -100  # the label cross_entropy skips


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str
    context: str = ""
    answer_start: int = -1
    answers: tuple[str, ...] = ()
    """Every gold answer text (scoring takes the best match); `answer` is the first, the one trained on."""


@dataclass(frozen=True)
class Encoded:
    example: Example
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass(frozen=True)
class DataReport:
    read: int
    selected: int
    kept: int
    truncated: int
    dropped: int
    length_percentiles: dict[str, int]
    prompt: str
    """How prompts are built and answers end (Prompter.describe)."""

    def lines(self) -> list[str]:
        p = self.length_percentiles
        return [self.prompt, f"data: {self.read} read, {self.selected} selected, {self.kept} kept, "
                f"{self.truncated} truncated (context cut around the answer), {self.dropped} dropped "
                f"(cannot fit)",
                "data: tokens per example " + ", ".join(f"{k} {v}" for k, v in p.items())]


# ---------------------------------------------------------------- loading

def load_examples(source: str, split: str = "train") -> list[Example]:
    """KorQuAD from the official JSON layout, a flat JSON/JSONL file, or a hub dataset id."""
    path = Path(source)
    if path.is_dir():
        raise UserError(f"data source {source} is a directory; give a .json or .jsonl file")
    if path.exists():
        return _examples_from_records(_read_records(path), str(path))
    if path.suffix in {".json", ".jsonl"} or source.startswith((".", "/")) or source.count("/") != 1:
        raise UserError(f"data file not found: {source}")
    return _examples_from_records(_read_hub(source, split), source)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Flat records (id, question, context, answers) from either file layout."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"data file {path} is not UTF-8 text (a JSON or JSONL file was expected)") from None
    if path.suffix == ".jsonl":
        return [_json_line(line, number, path) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"data file {path} is not valid JSON: {e}") from None
    if isinstance(raw, list):
        return raw
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise UserError(f"data file {path}: expected KorQuAD's {{'data': [...]}} layout or a list of records")
    return _flatten_official(raw["data"], path)


def _json_line(line: str, number: int, path: Path) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"data file {path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None


def _flatten_official(articles: list[Any], path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    records.append({"id": qa["id"], "question": qa["question"],
                                    "context": paragraph["context"], "answers": qa["answers"]})
    except (KeyError, TypeError) as e:
        raise UserError(f"data file {path}: article, paragraph or question without field {e}") from None
    return records


def _read_hub(name: str, split: str) -> list[dict[str, Any]]:
    import datasets  # imported here: only hub sources need it

    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as e:  # network, unknown dataset, unknown split: all the user's to fix
        raise UserError(f"cannot load dataset {name!r} split {split!r}: {str(e).splitlines()[0]}") from None


def _examples_from_records(records: list[dict[str, Any]], where: str) -> list[Example]:
    return [_example(r, i, where) for i, r in enumerate(records)]


def _example(record: Any, index: int, where: str) -> Example:
    if not isinstance(record, dict):
        raise UserError(f"{where}: record {index} is not an object")
    ident = str(record.get("id", index))
    for name in ("question", "answers"):
        if name not in record:
            raise UserError(f"{where}: example {ident} has no field {name!r}")
    answers = _answers(record["answers"], ident, where)
    text, start = answers[0]
    context = record.get("context") or ""
    if context and context[start:start + len(text)] != text:
        raise UserError(f"{where}: example {ident}: answer {text!r} not found at offset {start} of its context")
    return Example(id=ident, question=record["question"], answer=text, context=context, answer_start=start,
                   answers=tuple(t for t, _ in answers))


def _answers(answers: Any, ident: str, where: str) -> list[tuple[str, int]]:
    """Official layout: a list of {text, answer_start}; hub layout: {text: [...], answer_start: [...]}."""
    try:
        if isinstance(answers, dict):
            pairs = list(zip(answers["text"], answers["answer_start"]))
        else:
            pairs = [(a["text"], a["answer_start"]) for a in answers]
    except (KeyError, TypeError):
        pairs = []
    if not pairs:
        raise UserError(f"{where}: example {ident} has no answer with 'text' and 'answer_start'")
    if not all(isinstance(t, str) and t and isinstance(s, int) for t, s in pairs):
        raise UserError(f"{where}: example {ident}: answer must be non-empty text with an integer answer_start")
    return pairs


def select_examples(examples: list[Example], cfg: DataConfig, seed: int) -> list[Example]:
    """De-duplicate by question, optionally shuffle (seeded), take the first `limit`."""
    if cfg.dedup_questions:
        seen: set[str] = set()
        examples = [e for e in examples if not (e.question in seen or seen.add(e.question))]
    if cfg.shuffle:
        examples = examples[:]
        random.Random(seed).shuffle(examples)
    selected = examples[: cfg.limit]
    if not selected:
        raise UserError(f"data selection from {cfg.source} is empty")
    return selected


# ---------------------------------------------------------------- tokenization and masking

def encode_example(example: Example, prompter: Prompter, max_length: int) -> Encoded | None:
    """Prompt ids (IGNORE labels) + the answer's ids and its end token (learned). Returns None when
    the example cannot fit even with its context cut."""
    answer_ids = prompter.answer_ids(example.answer)
    answer_span = (example.answer_start, example.answer_start + len(example.answer))
    prompt_ids, truncated = encode_prompt(example, prompter, max_length - len(answer_ids), keep=answer_span)
    if prompt_ids is None:
        return None
    return Encoded(example=example, input_ids=prompt_ids + answer_ids,
                   labels=[IGNORE] * len(prompt_ids) + answer_ids, truncated=truncated)


def encode_prompt(example: Example, prompter: Prompter, budget: int,
                  keep: tuple[int, int] = (0, 1)) -> tuple[list[int] | None, bool]:
    """(prompt ids of at most `budget` tokens, whether the context was cut). Only a context is ever
    cut: to a window around the characters `keep` (the answer span in training; the context's start
    at generation time, when the answer is unknown). None when it cannot fit."""
    ids = prompter.prompt_ids(example.question, example.context)
    if len(ids) <= budget:
        return ids, False
    return (fit_context(example, prompter, budget, keep) if prompter.format.has_context else None), True


def fit_context(example: Example, prompter: Prompter, budget: int, keep: tuple[int, int]) -> list[int] | None:
    """Prompt ids of at most `budget` tokens whose context is a window of the original context
    that holds the characters keep[0]:keep[1], as centred on them as the context allows. The
    question is never cut. None when even the kept span alone does not fit."""
    room = budget - len(prompter.prompt_ids(example.question, ""))
    offsets = prompter.tokenizer(example.context, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
    t0 = next(i for i, (s, e) in enumerate(offsets) if e > keep[0])
    t1 = max(i for i, (s, e) in enumerate(offsets) if s < keep[1]) + 1
    for _ in range(8):  # re-tokenizing the cut text can shift a boundary token; shrink and retry
        if room < t1 - t0:
            return None
        lo = max(0, min(t0 - (room - (t1 - t0)) // 2, len(offsets) - room))
        hi = min(len(offsets), lo + room)
        window = example.context[offsets[lo][0]:offsets[hi - 1][1]]
        ids = prompter.prompt_ids(example.question, window)
        if len(ids) <= budget:
            return ids
        room -= len(ids) - budget
    return None


@dataclass(frozen=True)
class TokenizedData:
    rows: list[Encoded]
    report: DataReport

    @property
    def longest(self) -> int:
        """Tokens in the longest row (what the memory estimate and plan size a batch by)."""
        return max(len(r.input_ids) for r in self.rows)


def prepare_data(cfg: DataConfig, prompter: Prompter, seed: int) -> TokenizedData:
    """Load -> select -> encode every example; the report counts what was cut or dropped."""
    examples = load_examples(cfg.source, cfg.split)
    selected = select_examples(examples, cfg, seed)
    encoded = [encode_example(e, prompter, cfg.max_length) for e in selected]
    rows = [r for r in encoded if r is not None]
    if not rows:
        raise UserError(f"no example of {cfg.source} fits data.max_length={cfg.max_length}")
    report = DataReport(read=len(examples), selected=len(selected), kept=len(rows),
                        truncated=sum(r.truncated for r in rows), dropped=len(selected) - len(rows),
                        length_percentiles=percentiles([len(r.input_ids) for r in rows]),
                        prompt=prompter.describe())
    return TokenizedData(rows=rows, report=report)


def percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean": round(sum(ordered) / len(ordered)), "p50": pick(0.5), "p90": pick(0.9),
            "p99": pick(0.99), "max": ordered[-1]}


def inspect_rows(data: TokenizedData, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """What a person checks: the prompt as the model sees it, the supervised part decoded."""
    return [{"id": r.example.id,
             "prompt": tokenizer.decode([i for i, l in zip(r.input_ids, r.labels) if l == IGNORE]),
             "target": tokenizer.decode([l for l in r.labels if l != IGNORE]),
             "n_tokens": len(r.input_ids), "n_supervised": r.n_supervised, "truncated": r.truncated}
            for r in data.rows[:n]]
