"""Model families (qlora/families.py): per family, a toy model of its real architecture class with a
tokenizer of its layout and its real chat template (configs/templates/), through the whole product:
masking, train, resume, evaluate, merge, and each lever."""

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import evaluate
import train
from qlora.batching import collate, collate_packed
from qlora.checkpoint import list_checkpoints
from qlora.config import LoraConfig, ModelConfig, load_config
from qlora.data import IGNORE, encode_example, load_examples
from qlora.errors import UserError
from qlora.estimate import estimate_for_config
from qlora.families import FAMILIES, refusals
from qlora.loop import micro_batch_loss
from qlora.model import build_model, for_inference, load_tokenizer, read_architecture
from qlora.prompts import build_prompter
from tests.conftest import DEV_FILE, FIXTURE, REFERENCE, ROOT, TINY_YAML, assert_same_run

TEMPLATE_KWARGS = {"llama3.2": {"date_string": "26 Jul 2024"},  # else today's date is in every prompt
                   "qwen3": {"enable_thinking": False}}
ATTENTION = {"gemma2": "flex"}
"""What each family trains with here: Gemma-2's soft-capped logits rule out SDPA and varlen (qlora/families.py)."""
DENSE = {"gemma2": "eager"}
END_OF_TURN = {"llama3": "<|eot_id|>", "llama3.2": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
               "mistral": "</s>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>"}
"""The toy llama3.2 tokenizer is a base model's (EOS <|end_of_text|>), Gemma's EOS is <eos>: there
the end of turn can only come from the template."""
CPU = torch.device("cpu")


def prompter_of(families, name, fmt="chat"):
    tokenizer = load_tokenizer(ModelConfig(name=str(families[name][0]), tokenizer=str(families[name][1])))
    return build_prompter(tokenizer, fmt, TEMPLATE_KWARGS.get(name) if fmt.startswith("chat") else None)


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_rows_are_the_templates_own_tokens_and_only_the_answer_is_learned(families, name):
    """Over every question of the official dev set (the fixture where it is absent): the prompt is
    the template's generation prompt, the learned ids decode to the answer + end of turn, and (every
    fourth question) the row's ids are the tokenizer's ids of the template's whole rendering."""
    prompter = prompter_of(families, name)
    assert prompter.tokenizer.convert_ids_to_tokens(prompter.end_id) == END_OF_TURN[name]
    assert_rows_follow_the_template(prompter, load_examples(str(DEV_FILE if DEV_FILE.exists() else FIXTURE)))


def assert_rows_follow_the_template(prompter, examples):
    tokenizer, layout = prompter.tokenizer, prompter.chat
    end = tokenizer.convert_ids_to_tokens(prompter.end_id)
    for i, e in enumerate(examples):
        row = encode_example(e, prompter, 100_000)
        n_prompt = len(row.input_ids) - row.n_supervised
        answer = prompter.answer_text(e.answer)
        assert prompter.text(e.question, e.context) == prompter.render_chat(e.question, e.context, None) + layout.lead
        assert row.labels[:n_prompt] == [IGNORE] * n_prompt
        assert tokenizer.decode(row.labels[n_prompt:]) == answer + end, e.id
        if i % 4 == 0:  # tokenizing a whole rendering again costs as much as encoding: a quarter of them
            whole = prompter.render_chat(e.question, e.context, e.answer)
            assert row.input_ids == tokenizer(whole, add_special_tokens=False).input_ids[:len(row.input_ids)], e.id


def test_what_each_template_adds_is_reported(families):
    qwen3 = AutoTokenizer.from_pretrained(families["qwen3"][1])
    thinking = build_prompter(qwen3, "chat")  # without enable_thinking=false: an empty thinking block
    assert thinking.chat.lead == "<think>\n\n</think>\n\n"
    assert "'<think>\\n\\n</think>\\n\\n' before an answer" in thinking.describe()
    assert prompter_of(families, "qwen3").chat.lead == ""
    gemma = prompter_of(families, "gemma2")
    assert "strips the answer's leading ' \\n\\t' and trailing ' \\n\\t'" in gemma.describe()
    plain = prompter_of(families, "llama3", "extractive")
    assert plain.chat is None and plain.prompt_ids("질문")[0] == plain.tokenizer.bos_token_id
    with pytest.raises(UserError, match="messages is set by the loop itself"):
        build_prompter(gemma.tokenizer, "chat", {"messages": []})
    with pytest.raises(UserError, match="data.format=extractive uses no chat template"):
        build_prompter(gemma.tokenizer, "extractive", {"enable_thinking": False})
    gemma.tokenizer.chat_template = None
    with pytest.raises(UserError, match="needs a tokenizer with a chat template"):
        build_prompter(gemma.tokenizer, "chat")


def test_a_space_before_the_answer_and_whitespace_around_it_follow_the_template(families):
    """Mistral-7B-Instruct-v0.3 writes "[/INST] " + answer|trim + "</s>": the space is learned with
    the answer's first token (so the ids stay the template's own); answers with whitespace around
    them are stripped as the template strips them."""
    prompter = prompter_of(families, "mistral")
    v03 = prompter.tokenizer.chat_template.replace('{{- message["content"] + eos_token}}',
                                                   '{{- " " + message["content"]|trim + eos_token}}')
    assert v03 != prompter.tokenizer.chat_template
    prompter.tokenizer.chat_template = v03
    spaced = build_prompter(prompter.tokenizer, "chat")
    assert spaced.chat.joiner == " " and spaced.text("q").endswith("[/INST]")
    assert "writes ' ' before the answer" in spaced.describe()
    examples = load_examples(str(FIXTURE))
    padded = [dataclasses.replace(e, id=e.id + "-padded", answer=f" \n{e.answer}\n ", answer_start=-1)
              for e in examples[:4]]
    assert_rows_follow_the_template(spaced, examples + padded)
    qwen3 = prompter_of(families, "qwen3")  # lstrip('\n') of the answer, nothing else
    assert (qwen3.chat.answer_strips.left, qwen3.chat.answer_strips.right) == ("\n", "")
    assert_rows_follow_the_template(qwen3, padded)


def family_args(families, name, cache, out, *extra):
    model, tokenizer = families[name]
    kwargs = json.dumps(TEMPLATE_KWARGS.get(name, {}))
    return ["--config", str(TINY_YAML), *REFERENCE, f"model.name={model}", f"model.tokenizer={tokenizer}",
            f"model.random_init_cache={cache}", f"model.attn_implementation={ATTENTION.get(name, 'sdpa')}",
            "data.format=chat", "data.max_length=320", f"data.chat_template_kwargs={kwargs}",
            f"train.output_dir={out}", "train.max_steps=4", "eval.max_new_tokens=8", *extra]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_resumes_evaluates_and_merges(families, name, tmp_path, capsys):
    cache = tmp_path / "cache"
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    assert train.main(family_args(families, name, cache, run, "train.save_every=2", "train.keep_last=3")) == 0
    first = list_checkpoints(run)[0]
    assert train.main(family_args(families, name, cache, resumed, "--resume-from", str(first))) == 0
    assert_same_run(resumed, run)
    assert "prompt: the tokenizer's chat template; answers end with" in capsys.readouterr().out
    common = family_args(families, name, cache, run)
    assert evaluate.main([*common, "--adapter", str(run / "final"), "--limit", "6", "--out", str(tmp_path / "e")]) == 0
    assert len(json.loads((tmp_path / "e" / "predictions.json").read_text())) == 6
    merged = tmp_path / "merged"
    assert evaluate.main([*common, "--adapter", str(run / "final"), "--merge-to", str(merged),
                          "--merge-precision", "fp32"]) == 0
    (base,) = [p for p in cache.iterdir() if p.is_dir()]
    ids = torch.randint(3, 700, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                              run / "final").eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-4)


def loss_and_grads(families, name, batch, cache, attn, logits_only=True, precision="fp32", **model_kwargs):
    cfg = ModelConfig(name=str(families[name][0]), random_init=True, random_init_cache=str(cache),
                      attn_implementation=attn, **model_kwargs)
    model = build_model(cfg, LoraConfig(dropout=0.0), precision, CPU, seed=0)
    loss = micro_batch_loss(model, batch, precision, CPU, logits_only)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_lever_keeps_the_loss_and_gradient_or_is_refused(families, name, tmp_path):
    """Rows longer than the toy sliding windows (48 tokens): packed rows under varlen and flex
    attention (the window honoured per example; Gemma-2's soft-cap kept by flex, varlen refused),
    logits at supervised positions only (Gemma-2's final soft-capping applied), fewer recomputed
    layers, a dequantized layer, compiled layers (each family's own decoder layer); bf16 norms
    within bf16 rounding. The reference: padded rows under dense attention."""
    prompter = prompter_of(families, name)
    rows = [r for r in (encode_example(e, prompter, 320) for e in load_examples(str(FIXTURE))[:3]) if r]
    assert min(len(r.input_ids) for r in rows) > 48
    padded, packed = collate(rows, prompter.tokenizer.pad_token_id), collate_packed(rows)
    attn = DENSE.get(name, "sdpa")
    reference = loss_and_grads(families, name, padded, tmp_path, attn, logits_only=False)
    variants = [(packed, attn, {}), (padded, attn, {"recompute_layers": 0}), (padded, attn, {"dequantized_layers": 1})]
    if FAMILIES[name].model_type != "llama":  # Llama's compiled layer: tests/test_loop.py
        variants.append((packed, attn, {"compile_layers": True}))
    if name in DENSE:  # on the CPU flex and varlen run the same per-sequence code: flex where varlen is refused
        variants += [(packed, "flex", {}), (padded, "flex", {})]
        for refused in ("varlen", "sdpa"):
            with pytest.raises(UserError, match="soft-caps its attention logits.*flex"):
                loss_and_grads(families, name, packed, tmp_path, refused)
    else:
        variants.append((packed, "varlen", {}))
    for batch, variant_attn, kwargs in variants:
        loss, grads = loss_and_grads(families, name, batch, tmp_path, variant_attn, **kwargs)
        what = f"{variant_attn} {kwargs} {'packed' if 'position_ids' in batch else 'padded'}"
        torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-4, msg=what)
        for a, b in zip(grads, reference[1]):  # fp32 sums in another order: noise scales with the tensor
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())), msg=what)
    # bf16 norms, embeddings and head (model.upcast_non_quantized=false): bf16 rounding, no more
    losses = [loss_and_grads(families, name, packed, tmp_path, attn, precision="bf16", upcast_non_quantized=up)[0]
              for up in (True, False)]
    assert abs(losses[1] / losses[0] - 1) < 0.02


def test_generation_runs_the_dense_attention_the_model_allows():
    """varlen and flex know no left padding: generation runs SDPA, or eager where the model soft-caps
    its logits (SDPA would drop the cap)."""
    gemma = load_config(ROOT / "configs" / "gemma2-9b-korquad.yaml").model
    llama = load_config(ROOT / "configs" / "llama3.1-8b-korquad.yaml").model
    assert (gemma.attn_implementation, for_inference(gemma).attn_implementation) == ("flex", "eager")
    assert (llama.attn_implementation, for_inference(llama).attn_implementation) == ("varlen", "sdpa")
    assert for_inference(dataclasses.replace(llama, attn_implementation="flex")).attn_implementation == "sdpa"
    assert for_inference(dataclasses.replace(gemma, attn_implementation="eager")).attn_implementation == "eager"


def test_a_long_context_is_cut_inside_the_chat_turn_around_the_answer(families):
    prompter = prompter_of(families, "qwen2.5")
    for e in load_examples(str(FIXTURE)):
        limit = len(encode_example(e, prompter, 4096).input_ids) - 25
        row = encode_example(e, prompter, limit)
        assert row.truncated and len(row.input_ids) <= limit
        prompt = prompter.tokenizer.decode(row.input_ids[:len(row.input_ids) - row.n_supervised])
        assert e.answer in prompt.split("Context: ")[1].split("\n\nQuestion: ")[0], e.id
        assert e.question in prompt and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*-korquad.yaml")), ids=lambda p: p.stem)
def test_each_shipped_config_sets_only_levers_its_architecture_allows(path):
    cfg = load_config(path)
    assert path.stem.startswith("llama2-") or any(cfg.model.name in f.hub for f in FAMILIES.values())
    architecture = read_architecture(cfg.model)
    assert refusals(cfg.model, architecture) == []
    peak = estimate_for_config(cfg, architecture, cfg.data.max_length, ranks=4)["total"]  # sharded: 70B on 4
    assert 2**30 < peak < (20 if cfg.model.shard else 16) * 2**30  # a 24 GB card, else a 16 GB one


def test_the_toy_family_command_builds_what_train_needs(tmp_path, monkeypatch, capsys):
    from qlora import tiny

    monkeypatch.setattr("sys.argv", ["qlora.tiny", str(tmp_path), "--family", "gemma2", "--vocab", "600", str(FIXTURE)])
    tiny.main()
    printed = capsys.readouterr().out.split()
    assert printed[0] == f"model.name={tmp_path / 'model'}" and "data.format=chat" in printed
    prompter = build_prompter(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), "chat")
    assert prompter.tokenizer.convert_ids_to_tokens(prompter.end_id) == "<end_of_turn>"
    assert read_architecture(ModelConfig(name=str(tmp_path / "model"))).model_type == "gemma2"


def test_an_image_and_text_model_is_refused_before_it_loads(tmp_path, capsys):
    """Gemma-3 4B and up ship as Gemma3ForConditionalGeneration, a vision tower beside the decoder:
    the LoRA targets would match the tower's q/k/v too. Refused in one line, nothing loaded."""
    AutoConfig.for_model("gemma3").save_pretrained(tmp_path / "arch")  # vision + text config, no weights
    args = ["--config", str(TINY_YAML), f"model.arch={tmp_path / 'arch'}", "model.random_init=true",
            f"model.random_init_cache={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "is an image-and-text model (gemma3, a vision tower beside the decoder)" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()
