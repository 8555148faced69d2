"""Answer KorQuAD questions with the fine-tuned adapter and score them as the official script does.

    python evaluate.py --config C --adapter RUN/final [--limit N] [--out DIR]   # predictions + metrics
    python evaluate.py --config C --no-adapter [--limit N]                      # the base model, for before/after
    python evaluate.py --config C --adapter RUN/final --tutorial                # the tutorial's 5-question check
    python evaluate.py --config C --adapter RUN/final --merge-to DIR            # standalone fp16 model
    python evaluate.py --score PREDICTIONS.json --data KorQuAD_v1.0_dev.json    # score an existing file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from qlora import quiet_other_ranks
from qlora.config import Config, load_config
from qlora.data import Example, load_examples, select_examples
from qlora.errors import UserError, run_cli
from qlora.hub import offline_unless_reachable
from qlora.korquad_metric import EXPECTED_VERSION, gold_answers, score

# torch, transformers and peft load only where a model is used: --score and --help answer at once


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the training config (model, prompt format, eval section)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, help="a saved adapter directory, e.g. RUN/final")
    which.add_argument("--no-adapter", action="store_true", help="score the base model alone")
    p.add_argument("--limit", type=int, help="answer only the first N questions")
    p.add_argument("--out", type=Path, help="where predictions.json and metrics.json go")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation's files in --out")
    p.add_argument("--tutorial", action="store_true", help="the tutorial's 5-question substring check")
    p.add_argument("--merge-to", type=Path, metavar="DIR", help="merge the adapter into a standalone model")
    p.add_argument("--merge-precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--score", type=Path, metavar="PREDICTIONS", help="score a predictions file (with --data)")
    p.add_argument("--data", type=Path, help="the official-layout file --score scores against")
    return p.parse_intermixed_args(argv)


# ---------------------------------------------------------------- scoring files

def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}") from None


def score_files(predictions_path: Path, data_path: Path) -> dict[str, Any]:
    dataset = read_json(data_path, "data file")
    if not isinstance(dataset, dict) or "data" not in dataset:
        raise UserError(f"data file {data_path}: expected KorQuAD's {{'version', 'data'}} layout")
    version = str(dataset.get("version", ""))
    if version.startswith("KorQuAD_v2"):  # HTML contexts and long answers: another metric
        raise UserError(f"data file {data_path} is version {version!r}; this scorer expects {EXPECTED_VERSION}")
    if not version.startswith(EXPECTED_VERSION):  # as the official script: say so, score anyway
        print(f"warning: data file {data_path} is version {version!r}, not {EXPECTED_VERSION}", file=sys.stderr)
    predictions = read_json(predictions_path, "predictions file")
    if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
        raise UserError(f"predictions file {predictions_path}: expected {{question_id: answer text}}")
    try:
        gold = gold_answers(dataset)
    except (KeyError, TypeError) as e:
        raise UserError(f"data file {data_path}: article, paragraph or question without field {e}") from None
    unknown = sorted(set(predictions) - set(gold))
    if predictions and len(unknown) == len(predictions):
        raise UserError(f"predictions file {predictions_path}: none of its {len(predictions)} ids is in "
                        f"{data_path} (another data file?), e.g. {unknown[0]!r}")
    if unknown:  # as the official script: ids the data file lacks are ignored
        print(f"warning: {len(unknown)} ids of {predictions_path} are not in {data_path} and are ignored, "
              f"e.g. {unknown[0]!r}", file=sys.stderr)
    return score(gold, predictions)


# ---------------------------------------------------------------- answering

def eval_examples(cfg: Config, limit: int | None) -> list[Example]:
    source = cfg.eval.source or cfg.data.source
    examples = load_examples(source, cfg.eval.split)
    return examples[:limit] if limit else examples


def answer_and_score(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """Under torchrun every rank answers a share of the questions; rank 0 merges and scores."""
    from qlora import distributed
    from qlora.generate import generate_answers
    from qlora.model import load_for_inference, load_tokenizer
    from qlora.prompts import build_prompter

    out = None if args.tutorial else output_dir(args, cfg)  # checked before anything loads
    world, device = distributed.init(cfg.train.device)
    prompter = build_prompter(load_tokenizer(cfg.model), cfg.data.format, cfg.data.chat_template_kwargs)
    if args.tutorial:  # the tutorial asks 5 questions of the data it trained on
        examples = select_examples(load_examples(cfg.data.source, cfg.data.split), cfg.data, cfg.train.seed)[:5]
    else:
        examples = eval_examples(cfg, args.limit)
    model = load_for_inference(cfg.model, cfg.train.precision, device, cfg.train.seed,
                               None if args.no_adapter else args.adapter, cfg.eval.quantized)
    started = time.perf_counter()
    answers = generate_answers(model, prompter, examples[world.rank::world.size], cfg.data.max_length,
                               cfg.eval.max_new_tokens, cfg.eval.batch_size, cfg.train.precision, device,
                               progress=cfg.train.progress_bar and world.is_main)
    shares = distributed.gather_to_main(answers, world)  # a sync point: every rank's answers on rank 0
    seconds = time.perf_counter() - started
    if not world.is_main:
        return {}
    answers = {qid: answer for share in shares for qid, answer in share.items()}
    if args.tutorial:
        return tutorial_report(examples, answers)
    out.mkdir(parents=True, exist_ok=True)
    predictions = {qid: answer for qid, (answer, _) in answers.items()}
    (out / "predictions.json").write_text(json.dumps(predictions, ensure_ascii=False, indent=1), encoding="utf-8")
    metrics = {**score({e.id: list(e.answers) for e in examples}, predictions),
               "adapter": None if args.no_adapter else str(args.adapter), "seconds": seconds,
               "questions_per_s": len(examples) / seconds, "batch_size": cfg.eval.batch_size}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    print(f"wrote {out / 'predictions.json'} and {out / 'metrics.json'}")
    return metrics


def output_dir(args: argparse.Namespace, cfg: Config) -> Path:
    """--out, else RUN/eval beside the adapter (RUN/eval-base without one); an earlier evaluation
    there is replaced only with --overwrite."""
    out = args.out or (args.adapter.parent / "eval" if args.adapter else Path(cfg.train.output_dir) / "eval-base")
    if (out / "predictions.json").exists() and not args.overwrite:
        raise UserError(f"{out} already holds predictions.json (pass --overwrite to replace it, or --out DIR)")
    return out


def tutorial_report(examples: list[Example], answers: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The tutorial's check: is the gold answer a substring of the generation?"""
    hits = 0
    for e in examples:
        generation = answers[e.id][1]
        hit = e.answer in generation
        hits += hit
        print(f"Q: {e.question}\nanswer: {e.answer}\ngeneration: {generation.strip()}\nmatch: {hit}\n")
    print(f"score: {hits}/{len(examples)}")
    return {"tutorial_score": hits, "questions": len(examples)}


def merge(args: argparse.Namespace, cfg: Config) -> None:
    """The adapter folded into plain weights, saved with the tokenizer into a new or empty folder."""
    from qlora.distributed import launched_ranks
    from qlora.model import load_tokenizer, merge_adapter

    if not args.adapter:
        raise UserError("--merge-to needs --adapter")
    if launched_ranks() > 1:
        raise UserError("--merge-to runs on one process: run evaluate.py without torchrun")
    out: Path = args.merge_to
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--merge-to {out} is not an empty folder; name a new one (nothing was written)")
    merge_adapter(cfg.model, args.adapter, out, args.merge_precision, cfg.train.seed)
    load_tokenizer(cfg.model).save_pretrained(out)
    print(f"merged model written to {out}")


def run(args: argparse.Namespace) -> None:
    if args.score or args.data:
        if not (args.score and args.data):
            raise UserError("--score and --data go together")
        result = score_files(args.score, args.data)
        print(f"questions {result['questions']}, unanswered {result['unanswered']} (scored 0)")
        print(json.dumps({"exact_match": result["exact_match"], "f1": result["f1"]}))  # as the official script
        return
    if not args.config:
        raise UserError("--config is required (or --score with --data)")
    if not (args.adapter or args.no_adapter):
        raise UserError("name the adapter with --adapter RUN/final, or pass --no-adapter")
    quiet_other_ranks()  # under torchrun only rank 0 prints, from here on
    cfg = load_config(args.config, args.overrides)
    offline_unless_reachable(cfg)
    if args.merge_to:
        merge(args, cfg)
        return
    print(json.dumps(answer_and_score(args, cfg)))


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
