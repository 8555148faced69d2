"""KorQuAD 1.0 exact match and F1, as the official `evaluate-v1.0.py` defines them.

F1 is over characters, not words: a Korean answer with a particle attached ("서울에" for "서울")
would score 0 word-F1 but keeps most of its character F1.
"""

from __future__ import annotations

import string
from collections import Counter
from typing import Any

# replaced by a space before anything else, as the official script's remove_() does
SPACED = "'\"《》<>〈〉()‘’"
ASCII_PUNCTUATION = set(string.punctuation)
EXPECTED_VERSION = "KorQuAD_v1.0"


def normalize_answer(text: str) -> str:
    """Symbols -> space, lower-case, drop ASCII punctuation, collapse whitespace."""
    for ch in SPACED:
        text = text.replace(ch, " ")
    text = "".join(ch for ch in text.lower() if ch not in ASCII_PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
    """Character F1 of the normalized strings with spaces removed."""
    pred = list(normalize_answer(prediction).replace(" ", ""))
    gold = list(normalize_answer(truth).replace(" ", ""))
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(gold: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, Any]:
    """EM and F1 in percent over every gold question (max over its answers); a question without a
    prediction scores 0 and is counted in `unanswered`."""
    em = f1_total = 0.0
    unanswered = 0
    for qid, answers in gold.items():
        if qid not in predictions:
            unanswered += 1
            continue
        em += max(exact_match(predictions[qid], a) for a in answers)
        f1_total += max(f1(predictions[qid], a) for a in answers)
    n = len(gold)
    return {"exact_match": 100 * em / n, "f1": 100 * f1_total / n, "questions": n, "unanswered": unanswered}


def gold_answers(dataset: dict[str, Any]) -> dict[str, list[str]]:
    """{question id: [answer texts]} from an official-layout file's parsed JSON."""
    return {qa["id"]: [a["text"] for a in qa["answers"]]
            for article in dataset["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
