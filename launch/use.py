"""``python -m launch generate`` and ``python -m launch eval``: using a fine-tuned run.

Both load the base exactly as the run trained it (4-bit when it was, through the training's loader) and
attach the adapter; prompts are rendered with the run's own template (instruction or chat).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.env import apply_defaults


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help="a run directory (its adapter/) or an adapter directory")
    p.add_argument("--base", help="base model path, if not the one recorded with the adapter")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--max-new-tokens", type=_positive(int), default=128, help="most tokens generated")


def add_parsers(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gen = verbs.add_parser("generate", help="talk to a fine-tuned run: stream its answers to prompts")
    _model_args(gen)
    prompts = gen.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="one prompt (without it and --file: an interactive loop)")
    prompts.add_argument("--file", type=Path, help="a jsonl file of prompts ({'prompt': ...} per line)")
    gen.add_argument("--temperature", type=_non_negative, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=_positive(float), default=1.0, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    gen.add_argument("--merged", action="store_true", help="fold the adapter into the base first")
    ev = verbs.add_parser("eval", help="evaluate a fine-tuned run on a file in the run's format")
    _model_args(ev)
    ev.add_argument("--data", required=True, help="eval file (or glob) in the run's data format")
    ev.add_argument(
        "--metrics", default="loss", help="comma-separated: loss (always), exact_match, normalized_match"
    )
    ev.add_argument("--batch-size", type=_positive(int), default=8, help="micro-batch for the loss")
    ev.add_argument("--out", type=Path, help="where eval.json goes (default: the run directory)")
    ev.add_argument("--no-mlflow", action="store_true", help="do not log to the run's MLflow run")
    ev.add_argument("--nested", action="store_true", help="log to a nested child run of the run's run")


def _load(args: argparse.Namespace, merged: bool = False) -> Any:
    import torch

    from trainer.inference import load_trained

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return load_trained(args.source, base=args.base, merged=merged, device=device)


def user_errors(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """What a user gets wrong (the run, the adapter, the base, a prompt, an eval file) ends the verb with
    one line naming it and exit code 2, not a traceback."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from trainer.data import DataError
        from trainer.export import MergeError
        from trainer.inference import InferenceError

        try:
            return cmd(args)
        except (DataError, InferenceError, MergeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


@user_errors
def cmd_generate(args: argparse.Namespace) -> int:
    apply_defaults()
    from trainer.inference import GenerationSettings, generate, read_prompts

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.prompt is None and args.file is None and not sys.stdin.isatty():
        print("error: give --prompt TEXT or --file PROMPTS.jsonl (stdin is not a terminal)", file=sys.stderr)
        return 2
    trained = _load(args, merged=args.merged)
    if args.prompt is not None or args.file is not None:
        prompts = (
            [args.prompt] if args.prompt is not None else read_prompts(args.file, trained.data.prompt_field)
        )
        for prompt in prompts:
            if len(prompts) > 1:
                print(f"\n>>> {prompt}")
            generate(trained, prompt, settings, out=sys.stdout)
        return 0
    print(f"{trained.saved.cfg.method} adapter on {trained.saved.base_model}; an empty line or Ctrl-D ends")
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return 0
        if not prompt.strip():
            return 0
        generate(trained, prompt, settings, out=sys.stdout)


@user_errors
def cmd_eval(args: argparse.Namespace) -> int:
    apply_defaults()
    from trainer.checkpoints import atomic_write_text
    from trainer.inference import GenerationSettings, evaluate_file
    from trainer.inference.evaluate import report_table

    trained = _load(args)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    report = evaluate_file(
        trained, args.data, metrics, args.batch_size, GenerationSettings(max_new_tokens=args.max_new_tokens)
    )
    width = max(len(name) for name, _ in report_table(report))
    for name, value in report_table(report):
        print(f"{name:<{width}}  {value}")
    out = args.out or ((trained.run_dir or Path.cwd()) / "eval.json")
    atomic_write_text(out, json.dumps(vars(report), indent=2) + "\n")
    print(f"written to {out}")
    if not args.no_mlflow:
        _log_eval(trained, report, out, nested=args.nested)
    return 0


def _log_eval(trained: Any, report: Any, out: Path, nested: bool) -> None:
    summary_path = trained.run_dir / "summary.json" if trained.run_dir else None
    summary = json.loads(summary_path.read_text()) if summary_path and summary_path.is_file() else {}
    if not summary.get("mlflow_run_id"):
        print("(not logged to MLflow: the run recorded no MLflow run; --no-mlflow silences this)")
        return
    from trainer.tracking import log_to_run

    stem = Path(report.path).stem
    metrics = {f"eval/{stem}/{name}": value for name, value in report.metrics().items()}
    child = f"eval-{stem}" if nested else None
    run_id = log_to_run(summary["mlflow_tracking_uri"], summary["mlflow_run_id"], metrics, [out], child)
    print(
        f"logged to MLflow run {run_id}{' (nested under ' + summary['mlflow_run_id'] + ')' if nested else ''}"
    )
