import json

import pytest

from qlora.config import DataConfig
from qlora.data import IGNORE, Example, encode_example, load_examples, prepare_data, select_examples
from qlora.errors import UserError
from qlora.prompts import build_prompter
from tests.conftest import DEV_FILE, FIXTURE


def target_text(tokenizer, row) -> str:
    return tokenizer.decode([label for label in row.labels if label != IGNORE])


def prompt_text(tokenizer, row) -> str:
    return tokenizer.decode([i for i, label in zip(row.input_ids, row.labels) if label == IGNORE])


@pytest.mark.parametrize("family", ["sp_tokenizer", "bl_tokenizer"])
@pytest.mark.parametrize("fmt", ["closed_book", "extractive"])
def test_decoded_target_is_answer_plus_eos(request, family, fmt):
    tokenizer = request.getfixturevalue(family)
    for example in load_examples(str(FIXTURE)):
        row = encode_example(example, build_prompter(tokenizer, fmt), max_length=1024)
        assert not row.truncated
        assert target_text(tokenizer, row) == example.answer + tokenizer.eos_token
        # the prompt part is exactly the prompt: everything before the answer is masked
        assert row.labels[: len(row.labels) - row.n_supervised] == [IGNORE] * (len(row.labels) - row.n_supervised)
        assert row.input_ids[-row.n_supervised:] == row.labels[-row.n_supervised:]


@pytest.mark.parametrize("family", ["sp_tokenizer", "bl_tokenizer"])
def test_truncation_keeps_answer_and_question(request, family):
    tokenizer = request.getfixturevalue(family)
    examples = load_examples(str(FIXTURE))
    cut = 0
    for example in examples:
        full = encode_example(example, build_prompter(tokenizer, "extractive"), max_length=4096)
        limit = len(full.input_ids) - 25
        row = encode_example(example, build_prompter(tokenizer, "extractive"), max_length=limit)
        assert row is not None and row.truncated and len(row.input_ids) <= limit
        prompt = prompt_text(tokenizer, row)
        context = prompt.split("### Context:")[1].split("### Question:")[0]
        assert example.answer in context, example.id
        assert example.question in prompt
        assert target_text(tokenizer, row) == example.answer + tokenizer.eos_token
        cut += len(context) < len(example.context)
    assert cut == len(examples)


def test_answer_near_the_end_keeps_its_window_inside_the_context(sp_tokenizer):
    context = "가나다라마바사아자차카타파하 " * 30 + "정답은 여기"
    example = Example(id="end", question="어디?", answer="여기", context=context,
                      answer_start=context.index("여기"))
    room = len(build_prompter(sp_tokenizer, "extractive").prompt_ids(example.question, ""))
    row = encode_example(example, build_prompter(sp_tokenizer, "extractive"), max_length=room + 20)
    assert row.truncated and prompt_text(sp_tokenizer, row).rstrip().endswith("### Response:")
    assert "정답은 여기" in prompt_text(sp_tokenizer, row)


def test_examples_that_cannot_fit_are_dropped_and_counted(sp_tokenizer):
    cfg = DataConfig(source=str(FIXTURE), format="closed_book", max_length=20)
    with pytest.raises(UserError, match="no example .* fits data.max_length=20"):
        prepare_data(cfg, build_prompter(sp_tokenizer, cfg.format), seed=0)
    full = [encode_example(e, build_prompter(sp_tokenizer, "closed_book"), 4096) for e in load_examples(str(FIXTURE))]
    limit = sorted(len(r.input_ids) for r in full)[len(full) // 2]
    data = prepare_data(DataConfig(source=str(FIXTURE), format="closed_book", max_length=limit),
                        build_prompter(sp_tokenizer, "closed_book"), 0)
    assert data.report.dropped == sum(len(r.input_ids) > limit for r in full) > 0
    assert data.report.kept + data.report.dropped == data.report.selected == 24
    assert data.report.length_percentiles["max"] <= limit


def test_selection_dedup_shuffle_limit():
    examples = [Example(id=str(i), question=f"q{i % 5}", answer="a") for i in range(20)]
    cfg = DataConfig(source="x", dedup_questions=True)
    assert [e.id for e in select_examples(examples, cfg, 0)] == ["0", "1", "2", "3", "4"]
    cfg = DataConfig(source="x", shuffle=True, limit=6)
    first, again = select_examples(examples, cfg, 1), select_examples(examples, cfg, 1)
    assert first == again and len(first) == 6 and first != examples[:6]
    assert select_examples(examples, cfg, 2) != first


def test_flat_json_and_jsonl_and_hub_layout(tmp_path):
    record = {"id": "x1", "question": "수도는?", "context": "한국의 수도는 서울이다.",
              "answers": {"text": ["서울"], "answer_start": [8]}}
    (tmp_path / "a.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([record], ensure_ascii=False))
    for name in ("a.jsonl", "a.json"):
        (example,) = load_examples(str(tmp_path / name))
        assert (example.id, example.answer, example.answer_start) == ("x1", "서울", 8)


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"version": "x"}', "expected KorQuAD's"),
    ('[{"id": "a", "answers": []}]', "example a has no field 'question'"),
    ('[{"id": "a", "question": "q", "answers": []}]', "example a has no answer"),
    ('[{"id": "a", "question": "q", "context": "abc", "answers": [{"text": "z", "answer_start": 0}]}]',
     "example a: answer 'z' not found at offset 0"),
])
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_examples(str(path))
    assert str(path) in str(e.value)


def test_a_bad_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    good = json.dumps({"id": "x", "question": "q", "context": "abc", "answers": [{"text": "a", "answer_start": 0}]})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good, "", good, good, '{"id": "y", "question": ', good]) + "\n")
    with pytest.raises(UserError, match=rf"data file {path}, line 5: not valid JSON \(.* at column 25\)"):
        load_examples(str(path))


def test_missing_file_and_empty_selection(tmp_path, sp_tokenizer):
    with pytest.raises(UserError, match="data file not found: nope/x.json"):
        load_examples("nope/x.json")
    with pytest.raises(UserError, match="is a directory"):
        load_examples(str(tmp_path))
    (tmp_path / "empty.json").write_text('{"data": []}')
    with pytest.raises(UserError, match="selection from .* is empty"):
        prepare_data(DataConfig(source=str(tmp_path / "empty.json")), build_prompter(sp_tokenizer, "extractive"), 0)


@pytest.mark.skipif(not DEV_FILE.exists(), reason="the official dev file is not on this machine")
def test_every_supervised_span_of_the_official_dev_file(sp_tokenizer):
    """All 5,774 dev questions at 512 tokens: most contexts are cut, every answer survives."""
    examples = load_examples(str(DEV_FILE))
    assert len(examples) == 5774
    data = prepare_data(DataConfig(source=str(DEV_FILE), format="extractive", max_length=512),
                        build_prompter(sp_tokenizer, "extractive"), 0)
    assert data.report.truncated > 0
    for row in data.rows:
        assert len(row.input_ids) <= 512
        assert target_text(sp_tokenizer, row) == row.example.answer + sp_tokenizer.eos_token, row.example.id
    truncated = [r for r in data.rows if r.truncated]
    for row in truncated[::10]:
        assert row.example.answer in prompt_text(sp_tokenizer, row).split("### Question:")[0], row.example.id
