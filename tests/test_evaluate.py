"""The official KorQuAD metric, scoring files, train -> evaluate end to end, merged export."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import evaluate
from qlora.korquad_metric import exact_match, f1, normalize_answer, score
from tests.conftest import DEV_FILE, FIXTURE, TINY_YAML


@pytest.mark.parametrize("text, normalized", [
    ("《훈민정음》", "훈민정음"),
    ("〈세종실록〉 (1454)", "세종실록 1454"),
    ("‘한강’의 기적!", "한강 의 기적"),
    ("  LG  CNS.  ", "lg cns"),
    ('"서울"', "서울"),
])
def test_normalize(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_character_f1_by_hand():
    assert exact_match("서울.", "서울") == 1.0
    assert exact_match("세종 대왕", "세종대왕") == 0.0
    assert f1("세종 대왕", "세종대왕") == 1.0  # spaces do not count in character F1
    # a particle attached: 2 of 3 predicted characters are right, all 2 gold ones are found
    assert f1("서울에", "서울") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # 0.8
    # '1446년 10월' vs '1446년': common 1,4,4,6,년 = 5; precision 5/8, recall 1
    assert f1("1446년 10월", "1446년") == pytest.approx(10 / 13)
    assert f1("부산", "서울") == 0.0 and f1("", "서울") == 0.0


def test_score_takes_the_best_answer_and_counts_the_unanswered():
    gold = {"a": ["서울", "서울특별시"], "b": ["1446년"], "c": ["세종"]}
    result = score(gold, {"a": "서울특별시", "b": "1446년에"})
    assert result["unanswered"] == 1 and result["questions"] == 3
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 * (5 / 6) / (5 / 6 + 1)) / 3)


def score_cli(predictions, data, capsys):
    """evaluate.py --score: (exit code, stdout, stderr)."""
    code = evaluate.main(["--score", str(predictions), "--data", str(data)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.skipif(not DEV_FILE.exists(), reason="the official dev file is not on this machine")
def test_scoring_a_predictions_file_for_the_official_dev_set(tmp_path, capsys):
    dataset = json.loads(DEV_FILE.read_text())
    qas = [qa for a in dataset["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert len(qas) == 5774
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps({qa["id"]: qa["answers"][0]["text"] for qa in qas}, ensure_ascii=False))
    code, out, _ = score_cli(perfect, DEV_FILE, capsys)
    assert code == 0
    assert json.loads(out.splitlines()[-1]) == {"exact_match": 100.0, "f1": 100.0}
    # every other question unanswered, the rest with a particle appended: EM 0, F1 shrinks
    half = {qa["id"]: qa["answers"][0]["text"] + "에" for qa in qas[::2]}
    (tmp_path / "half.json").write_text(json.dumps(half, ensure_ascii=False))
    code, out, _ = score_cli(tmp_path / "half.json", DEV_FILE, capsys)
    last = json.loads(out.splitlines()[-1])
    expected_f1 = 100 * sum(f1(qa["answers"][0]["text"] + "에", qa["answers"][0]["text"]) for qa in qas[::2]) / 5774
    assert last["exact_match"] == 0.0 and last["f1"] == pytest.approx(expected_f1)
    assert "unanswered 2887" in out


def test_ids_the_data_file_lacks_are_ignored_as_the_official_script_does(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"version": "KorQuAD_v1.0", "data": json.loads(FIXTURE.read_text())["data"]}))
    qas = [qa for a in json.loads(FIXTURE.read_text())["data"] for p in a["paragraphs"] for qa in p["qas"]]
    predictions = {qa["id"]: qa["answers"][0]["text"] for qa in qas[:12]} | {"not-in-data": "x", "nor-this": "y"}
    (tmp_path / "p.json").write_text(json.dumps(predictions, ensure_ascii=False))
    code, out, err = score_cli(tmp_path / "p.json", data, capsys)
    assert code == 0 and "warning: 2 ids of" in err and "are not in" in err
    assert json.loads(out.splitlines()[-1]) == {"exact_match": 50.0, "f1": 50.0}


@pytest.mark.parametrize("predictions, data_text, message", [
    ('{"nope": "x"}', None, "none of its 1 ids is in"),
    ("{broken", None, "is not valid JSON"),
    ('["a list"]', None, "expected {question_id: answer text}"),
    ('{}', '{"version": "KorQuAD_v2.0", "data": []}', "is version 'KorQuAD_v2.0'; this scorer expects KorQuAD_v1.0"),
    ('{}', '{"version": "KorQuAD_v1.0", "data": [{"paragraphs": [{"qas": [{"id": 1}]}]}]}', "without field"),
])
def test_bad_scoring_inputs_exit_2(tmp_path, predictions, data_text, message, capsys):
    data = tmp_path / "data.json"
    data.write_text(data_text or json.dumps({"version": "KorQuAD_v1.0", "data": json.loads(FIXTURE.read_text())["data"]}))
    (tmp_path / "p.json").write_text(predictions)
    code, _, err = score_cli(tmp_path / "p.json", data, capsys)
    assert code == 2 and message in err


def test_train_then_evaluate_end_to_end(tiny_run, tmp_path, capsys):
    out, cache = tiny_run
    run = tmp_path / "run"  # a copy: the shared run stays as training left it
    shutil.copytree(out / "final", run / "final")
    common = ["--config", str(TINY_YAML), f"model.random_init_cache={cache}", "train.progress_bar=false"]
    assert evaluate.main([*common, "--adapter", str(run / "final")]) == 0
    predictions = json.loads((run / "eval" / "predictions.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    ids = [qa["id"] for a in json.loads(FIXTURE.read_text())["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert sorted(predictions) == sorted(ids)
    assert metrics["exact_match"] >= 90 and metrics["questions"] == 24
    # an earlier evaluation is replaced only when asked
    capsys.readouterr()
    assert evaluate.main([*common, "--adapter", str(run / "final")]) == 2
    assert f"{run / 'eval'} already holds predictions.json (pass --overwrite" in capsys.readouterr().err
    assert evaluate.main([*common, "--adapter", str(run / "final"), "--overwrite", "--limit", "3"]) == 0
    assert len(json.loads((run / "eval" / "predictions.json").read_text())) == 3
    # a config that trains with varlen attention generates through SDPA (left padding): same answers
    assert evaluate.main([*common, "model.attn_implementation=varlen", "--adapter", str(run / "final"),
                          "--out", str(run / "varlen")]) == 0
    assert json.loads((run / "varlen" / "predictions.json").read_text()) == predictions
    assert evaluate.main([*common, "--no-adapter", "--out", str(run / "base")]) == 0
    base = json.loads((run / "base" / "metrics.json").read_text())
    assert base["exact_match"] < 10  # a random model knows nothing; the adapter learned the answers
    capsys.readouterr()
    assert evaluate.main([*common, "--adapter", str(run / "final"), "--tutorial"]) == 0
    printed = capsys.readouterr().out
    assert "score: " in printed and printed.count("match: ") == 5
    # the README's --score example: the fixture is KorQuAD's layout under its own version name
    code, out_text, err = score_cli(run / "varlen" / "predictions.json", FIXTURE, capsys)
    assert code == 0 and "is version 'qlora_loop_tiny_v1', not KorQuAD_v1.0" in err
    assert json.loads(out_text.splitlines()[-1])["exact_match"] == pytest.approx(metrics["exact_match"])


def test_merged_model_gives_the_same_logits_as_base_plus_adapter(tiny_run, tmp_path, capsys):
    out, cache = tiny_run
    before = sorted(p.name for p in (out / "final").iterdir())
    assert evaluate.main(["--config", str(TINY_YAML), f"model.random_init_cache={cache}", "--adapter",
                          str(out / "final"), "--merge-to", str(out / "final")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "final").iterdir()) == before
    merged_dir = tmp_path / "merged"
    assert evaluate.main(["--config", str(TINY_YAML), f"model.random_init_cache={cache}", "--adapter",
                          str(out / "final"), "--merge-to", str(merged_dir), "--merge-precision", "fp32"]) == 0
    (base_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    ids = torch.randint(3, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                              out / "final").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits  # plain transformers
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-4)
    assert not any("lora" in k for k in AutoModelForCausalLM.from_pretrained(merged_dir).state_dict())
    assert (merged_dir / "tokenizer.json").exists()


def test_evaluate_needs_an_adapter_choice(capsys, tmp_path):
    assert evaluate.main(["--config", str(TINY_YAML)]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert evaluate.main(["--config", str(TINY_YAML), "--adapter", str(tmp_path)]) == 2
    assert f"no adapter in {tmp_path}" in capsys.readouterr().err
