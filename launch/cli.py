"""The command line: ``python -m launch VERB``.

``train CONFIG [section.key=value ...]`` fine-tunes; ``submit`` sends the same as a Ray Job; ``sweep``
runs many fine-tunes over a grid as Ray Tune trials under one MLflow parent run; ``plan CONFIG`` says
what memory it needs per GPU and host (launch/plan.py); ``runs`` lists and compares recent MLflow runs;
``merge RUN_DIR_OR_ADAPTER --out DIR`` folds an adapter into its base; ``generate`` and ``eval`` use a
fine-tuned run (launch/use.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from launch import plan as plan_lib
from launch import submit as submit_lib
from launch import sweep as sweep_lib
from launch import use as use_lib
from launch.env import apply_defaults, clear_stale_build_locks, keep_ray_on_loopback, launch_id, resolve_paths
from launch.errors import USAGE_EXIT, ReportedError, usage_error
from launch.runs import DEMO_STORE
from trainer import config as config_lib


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    train = verbs.add_parser("train", help="fine-tune as the config says")
    train.add_argument("config", type=Path, help="YAML run config (see configs/)")
    train.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. adapter.rank=16 train.max_steps=10"
    )
    submit_lib.add_parser(verbs)
    sweep_lib.add_parser(verbs)
    plan_lib.add_parser(verbs)
    runs = verbs.add_parser("runs", help="list and compare recent MLflow runs")
    runs.add_argument("--experiment", help="only this experiment (default: all)")
    runs.add_argument("--uri", help=f"tracking URI (default: $MLFLOW_TRACKING_URI, else {DEMO_STORE})")
    runs.add_argument("--limit", type=int, default=20, help="how many runs, newest first")
    runs.add_argument(
        "--sweep", metavar="PARENT_RUN_ID", help="list the trials of this sweep (its parent run)"
    )
    merge = verbs.add_parser("merge", help="fold a trained adapter into its base: a full transformers model")
    merge.add_argument("source", type=Path, help="a run directory (its adapter/) or an adapter directory")
    merge.add_argument("--out", type=Path, required=True, help="where to write the merged model directory")
    merge.add_argument("--base", help="base model path, if not the one recorded with the adapter")
    merge.add_argument(
        "--device", default="cpu", help="where to rebuild the 4-bit base and merge (cpu, cuda); default cpu"
    )
    merge.add_argument(
        "--allow-base-mismatch", action="store_true",
        help="merge even if the re-quantised 4-bit base differs from the one the adapter trained on",
    )  # fmt: skip
    use_lib.add_parsers(verbs)
    return parser


def cmd_runs(args: argparse.Namespace) -> int:
    from launch.runs import print_runs

    apply_defaults()  # MLflow's telemetry off here too

    if args.sweep:
        from launch.runs import print_sweep

        return print_sweep(args.uri, args.sweep)
    return print_runs(args.uri, args.experiment, args.limit)


def cmd_merge(args: argparse.Namespace) -> int:
    apply_defaults()
    from trainer.export import MergeError, merge_adapter

    try:
        out = merge_adapter(args.source, args.out, args.base, args.device, args.allow_base_mismatch)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spawned_worker = "RANK" in os.environ  # started by a launcher (ours, torchrun, srun): the parent reports
    env = apply_defaults()
    cfg = resolve_paths(config_lib.load(args.config, args.overrides))
    from trainer.tracking import prepare_local_store, resolve_run

    cfg = resolve_run(cfg)  # MLflow URI, experiment, run name fixed once, for every worker
    if not spawned_worker:
        prepare_local_store(cfg.tracking)
        clear_stale_build_locks()
    if cfg.model.build is not None:
        from trainer.model import ensure_tiny_model

        ensure_tiny_model(cfg.model.path, cfg.model.build)
    if not spawned_worker and (note := plan_lib.check_devices(cfg)):
        print(note, file=sys.stderr)  # train.force: the plan's table, then the run
    Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
    if cfg.distributed.backend == "ray":
        keep_ray_on_loopback(cfg, env)
        from launch.ray_job import run_ray

        run_ray(cfg, env, job_id=launch_id(cfg.output.dir))
    else:
        from launch.local import run_local

        run_local(cfg)
    return 0 if spawned_worker else _print_summary(Path(cfg.output.dir))


def _print_summary(out: Path) -> int:
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        print(f"error: the run wrote no {summary_path}", file=sys.stderr)
        return 1
    s = json.loads(summary_path.read_text())
    print(f"\ndone: {s['steps']} steps in {s['wall_s']:.1f} s, {s['tokens_per_s']:.0f} tokens/s")
    print(f"  train loss {s['train_loss_first']:.4f} -> {s['train_loss_last']:.4f}")
    if s.get("eval_loss") is not None:
        print(f"  eval loss  {s['eval_loss_first']:.4f} -> {s['eval_loss']:.4f}")
    if s.get("exact_match") is not None:
        first, last, n = s["exact_match_first"], s["exact_match"], s["sample_prompts"]
        print(f"  exact match {first:.0%} -> {last:.0%} (greedy, on the {n} eval prompts)")
        _print_samples(s["samples_first"], s["samples_last"])
        print()
    print(f"  outputs    {out}/ (adapter/, config.yaml, summary.json, samples.jsonl)")
    if s.get("mlflow_run_id"):
        print(f"  mlflow     run {s['mlflow_run_id']} at {s['mlflow_tracking_uri']}")
    return 0


def _print_samples(before: list[dict[str, str]], after: list[dict[str, str]]) -> None:
    """The same prompts' answers at the run's first and last evaluation."""
    for first, last in zip(before, after, strict=False):
        prompt = " ".join(first["prompt"].split())
        print(f"\n  prompt     {prompt}")
        print(f"  reference  {first['reference']}")
        print(f"  before     {first['generation']!r}")
        print(f"  after      {last['generation']!r}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb == "sweep" and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value after the sweep's options: overrides too
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        verbs = {
            "train": cmd_train, "runs": cmd_runs, "merge": cmd_merge, "submit": submit_lib.cmd_submit,
            "sweep": sweep_lib.cmd_sweep, "plan": plan_lib.cmd_plan,
            "generate": use_lib.cmd_generate, "eval": use_lib.cmd_eval,
        }  # fmt: skip
        return verbs[args.verb](args)
    except ReportedError:
        return USAGE_EXIT
    except Exception as e:
        found = usage_error(e)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return USAGE_EXIT
