"""Prompts, shared by training (data.py) and generation (generate.py) so both see the same tokens.

A `Prompter` turns one question (and its context) into the ids before the answer, and an answer
into the ids the model learns: the answer as the prompt format renders it, then the one token that
ends it, the same token generation stops at.

Two kinds of format (`data.format`):
- plain text (`closed_book`, the tutorial's Alpaca-style template; `extractive`), for base models:
  the tokenizer adds its BOS, the answer ends with the tokenizer's EOS;
- the tokenizer's own chat template (`chat`: context + question in the user turn; `chat_closed_book`:
  the question alone), for instruct models: the answer ends with the template's end-of-turn token
  (<|eot_id|>, <|im_end|>, <end_of_turn>, </s>), found by rendering the template, not by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora.errors import UserError

HEADER = ("Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.")
TASK = "Answer the question with a span copied from the context."


@dataclass(frozen=True)
class Format:
    text: str
    """The prompt (plain formats) or the user turn (chat formats), with {question} and {context}."""
    has_context: bool
    chat: bool

    def render(self, question: str, context: str) -> str:
        return self.text.format(question=question, context=context)


FORMATS = {
    # The tutorial's template, unchanged: the full training text is prompt + " " + answer.
    "closed_book": Format(HEADER + " ### Instruction: {question} ### Response:", False, False),
    # The real KorQuAD task: read the context, answer with a span of it.
    "extractive": Format(HEADER + f" ### Instruction: {TASK}"
                         "\n### Context: {context}\n### Question: {question}\n### Response:", True, False),
    "chat": Format(TASK + "\n\nContext: {context}\n\nQuestion: {question}", True, True),
    "chat_closed_book": Format("{question}", False, True),
}

# Stand-ins rendered through a chat template to find where the user turn and the answer go.
USER_MARK, ANSWER_MARK = "QLORAUSERMARK", "QLORAANSWERMARK"


@dataclass(frozen=True)
class ChatLayout:
    """A chat template cut at its two contents: the rendered conversation of one question is
    head + user + middle + joiner + answer + end of turn..., each content stripped of the
    whitespace the template strips. `middle` ends with the generation prompt and whatever the
    template puts before an answer beyond it (`lead`: Qwen3's empty thinking block). `joiner` is
    the spaces the template writes right before the answer (Mistral-v0.3's "[/INST] answer"):
    they belong to the answer's first token, so they are learned with the answer, not prompted."""
    head: str
    middle: str
    joiner: str
    lead: str
    user_strips: Strips
    answer_strips: Strips


@dataclass(frozen=True)
class Prompter:
    """One format's prompts for one tokenizer (build_prompter makes it)."""
    tokenizer: Any
    format: Format
    end_id: int
    """The token every answer ends with: the one the model learns to stop with and generation stops at."""
    chat: ChatLayout | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def text(self, question: str, context: str = "") -> str:
        """Everything before the answer, as text."""
        user = self.format.render(question, context)
        if self.chat is None:
            return user
        return self.chat.head + self.chat.user_strips.apply(user) + self.chat.middle

    def prompt_ids(self, question: str, context: str = "") -> list[int]:
        # A chat template writes its own BOS (or none); the tokenizer must not add another.
        return self.tokenizer(self.text(question, context), add_special_tokens=self.chat is None).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        """Tokenized on its own, then joined to the prompt's ids: SentencePiece would merge pieces
        across the boundary of the joined text, so the answer's ids could not be found in it."""
        return self.tokenizer(self.answer_text(answer), add_special_tokens=False).input_ids + [self.end_id]

    def answer_text(self, answer: str) -> str:
        """The answer as the template writes it: stripped as it strips, after its joining spaces."""
        return self.chat.joiner + self.chat.answer_strips.apply(answer) if self.chat else answer

    def render_chat(self, question: str, context: str, answer: str | None) -> str:
        """The tokenizer's own rendering of one question (and its answer): what `text` and
        `answer_ids` must agree with (tests check it over the whole dev set)."""
        return _render(self.tokenizer, _messages(self.format.render(question, context), answer), answer is None,
                       self.template_kwargs)

    def describe(self) -> str:
        """One line for the data report: how answers end, and what the template adds."""
        end = self.tokenizer.convert_ids_to_tokens(self.end_id)
        if self.chat is None:
            return f"prompt: plain text; answers end with EOS {end!r} (id {self.end_id})"
        line = f"prompt: the tokenizer's chat template; answers end with {end!r} (id {self.end_id}), where generation stops"
        if self.chat.lead:
            line += (f"; the template puts {self.chat.lead!r} before an answer beyond its generation prompt: "
                     "it is part of the prompt, not learned")
        if self.chat.joiner:
            line += f"; the template writes {self.chat.joiner!r} before the answer: learned with it"
        strips = self.chat.answer_strips
        if strips.chars:
            sides = [f"{side} {chars!r}" for side, chars in (("leading", strips.left), ("trailing", strips.right)) if chars]
            line += f"; the template strips the answer's {' and '.join(sides)}: so does the learned answer"
        return line


def build_prompter(tokenizer: Any, fmt: str, template_kwargs: dict[str, Any] | None = None) -> Prompter:
    template_kwargs = dict(template_kwargs or {})
    if not FORMATS[fmt].chat:
        if template_kwargs:
            raise UserError(f"data.chat_template_kwargs is set, but data.format={fmt} uses no chat template")
        return Prompter(tokenizer, FORMATS[fmt], tokenizer.eos_token_id)
    if RESERVED & template_kwargs.keys():
        raise UserError(f"data.chat_template_kwargs: {', '.join(sorted(RESERVED & template_kwargs.keys()))} "
                        "is set by the loop itself")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"data.format={fmt} needs a tokenizer with a chat template, and this one has none "
                        "(a base model's? use format extractive, or model.tokenizer=the instruct model's)")
    layout, end_id = chat_layout(tokenizer, template_kwargs)
    return Prompter(tokenizer, FORMATS[fmt], end_id, layout, template_kwargs)


def chat_layout(tokenizer: Any, kwargs: dict[str, Any]) -> tuple[ChatLayout, int]:
    """Render the template with marks for the user turn and the answer, cut it there, and find
    the token that ends an answer (the first token after it, which must be a special token)."""
    full = _render(tokenizer, _messages(USER_MARK, ANSWER_MARK), False, kwargs)
    if full.count(USER_MARK) != 1 or full.count(ANSWER_MARK) != 1:
        raise UserError("the chat template does not render one user turn and one answer as given")
    head, rest = full.split(USER_MARK)
    before_answer, tail = rest.split(ANSWER_MARK)
    middle = before_answer.rstrip(" ")
    prompt = head + USER_MARK + middle
    generation = _render(tokenizer, _messages(USER_MARK, None), True, kwargs)
    if not prompt.startswith(generation):
        raise UserError("the chat template's generation prompt is not the start of its rendered answer "
                        "turn: training and generation would see different prompts")
    tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
    if not tail_ids or not _is_special(tokenizer, tail_ids[0]):
        raise UserError(f"the chat template ends an answer with {tail[:20]!r}, not a special token: "
                        "generation could not stop on it")
    layout = ChatLayout(head=head, middle=middle, joiner=before_answer[len(middle):], lead=prompt[len(generation):],
                        user_strips=_probe_strips(tokenizer, kwargs, USER_MARK, full),
                        answer_strips=_probe_strips(tokenizer, kwargs, ANSWER_MARK, full))
    return layout, tail_ids[0]


@dataclass(frozen=True)
class Strips:
    """Which whitespace a template strips from a content, on which side (Jinja's trim: all of it;
    Qwen3's answer: leading newlines)."""
    left: str = ""
    right: str = ""

    @property
    def chars(self) -> str:
        return self.left + self.right

    def apply(self, text: str) -> str:
        return text.lstrip(self.left).rstrip(self.right) if self.chars else text


WHITESPACE = (" ", "\n", "\t")


def _probe_strips(tokenizer: Any, kwargs: dict[str, Any], mark: str, full: str) -> Strips:
    """Render one content wrapped in each whitespace character and see which survive: what the
    rendering gains around the mark, against `full` (the rendering of the bare marks)."""
    before, after = full.split(mark)
    left = right = ""
    for c in WHITESPACE:
        probe = c + mark + c
        user, answer = (probe, ANSWER_MARK) if mark == USER_MARK else (USER_MARK, probe)
        text = _render(tokenizer, _messages(user, answer), False, kwargs)
        at = text.index(mark)
        left += "" if text[len(before):at] == c else c
        right += "" if text[at + len(mark):len(text) - len(after)] == c else c
    return Strips(left, right)


def _is_special(tokenizer: Any, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def _messages(user: str, answer: str | None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": user}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


RESERVED = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message"})


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, kwargs: dict[str, Any]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
    except Exception as e:  # jinja's raise_exception, a template error: the user's template or kwargs
        raise UserError(f"the chat template failed: {str(e).splitlines()[0]}") from None
