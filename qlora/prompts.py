"""Prompt templates, shared by training (data.py) and generation (evaluate.py) so both see the
same text. A prompt ends where the answer starts; the answer is tokenized on its own (data.py)."""

from __future__ import annotations

HEADER = ("Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.")

# The tutorial's template, unchanged: the full training text is PROMPT + " " + answer.
CLOSED_BOOK = HEADER + " ### Instruction: {question} ### Response:"

# The real KorQuAD task: read the context, answer with a span of it.
EXTRACTIVE = (HEADER + " ### Instruction: Answer the question with a span copied from the context."
              "\n### Context: {context}\n### Question: {question}\n### Response:")

TEMPLATES = {"closed_book": CLOSED_BOOK, "extractive": EXTRACTIVE}


def render_prompt(fmt: str, question: str, context: str = "") -> str:
    """The prompt text for one question; `context` may already be cut to fit (data.py)."""
    return TEMPLATES[fmt].format(question=question, context=context)
