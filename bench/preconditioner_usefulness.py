"""Is the Riemannian preconditioner useful? Learning-rate robustness of scaled AdamW / scaled GD.

    python -m bench.preconditioner_usefulness [--steps 300] [--workers 2] [--families adamw,sgd]

Reproduces in spirit the claim of Zhang & Pilanci (arXiv 2402.02347) that scaled AdamW and scaled GD
are much less sensitive to the learning rate than AdamW and GD. A 4.7M-parameter Llama is pre-trained
briefly on the standard library's docstrings (cached under .cache/bench/), then LoRA r=8 (all linear
layers) is fine-tuned on the installed packages' README texts, with eval loss on held-out packages.
Every run shares the base, the adapter init and the batch order (see bench/usefulness_train.py).

Swept: AdamW vs scaled AdamW and SGD vs scaled GD over >= 300x of learning rate, the scaled variants
with absolute damping 1e-2 (PEFT's default), 1e-6 (the paper's GPT-2 setting) and relative damping;
plus PEFT's own create_riemannian_optimizer at a couple of learning rates, as a cross-check of ours.
Per variant: best and worst final eval loss over the sweep, their ratio, how many learning rates end
within 1% of the best, and the steps needed to reach AdamW's best final eval loss.

Writes bench/results/preconditioner_usefulness.json (machine, settings, every run's eval-loss curve)
and preconditioner_usefulness.png (final eval loss vs learning rate; eval-loss curves).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any

from transformers import AutoTokenizer

from bench.common import RESULTS, print_table, write_results
from bench.usefulness_data import BaseShape, ensure_base, fine_tune_data
from bench.usefulness_train import Protocol, Variant, fine_tune, init_worker

ADAMW_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
SGD_LRS = [1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0]
PEFT_LRS = [1e-3, 1e-2]
FAMILIES: dict[str, tuple[list[float], list[Variant]]] = {
    "adamw": (
        ADAMW_LRS,
        [
            Variant("AdamW", "adamw"),
            Variant("scaled AdamW, abs 1e-2", "adamw", "riemannian", "absolute", 1e-2),
            Variant("scaled AdamW, abs 1e-6", "adamw", "riemannian", "absolute", 1e-6),
            Variant("scaled AdamW, rel 1e-2", "adamw", "riemannian", "relative", 1e-2),
            Variant("scaled AdamW, rel 1e-2 + 1e-2", "adamw", "riemannian", "relative", 1e-2, 1e-2),
        ],
    ),
    "sgd": (
        SGD_LRS,
        [
            Variant("SGD", "sgd"),
            Variant("scaled GD, abs 1e-2", "sgd", "riemannian", "absolute", 1e-2),
            Variant("scaled GD, abs 1e-6", "sgd", "riemannian", "absolute", 1e-6),
            Variant("scaled GD, rel 1e-2", "sgd", "riemannian", "relative", 1e-2),
        ],
    ),
}
PEFT = Variant("PEFT scaled AdamW, abs 1e-2", "adamw", "peft", "absolute", 1e-2)
# Ours with float64 solves: how far float rounding alone moves a run (the noise floor of the PEFT check).
FLOAT64 = Variant(
    "scaled AdamW, abs 1e-2, f64", "adamw", "riemannian", "absolute", 1e-2, solve_dtype="float64"
)
TARGET_RATIO, TARGET_SLACK = 1.17, 0.01


def tasks(families: list[str], proto: Protocol, peft: bool) -> list[tuple[Variant, float, Protocol]]:
    out = [(v, lr, proto) for fam in families for v in FAMILIES[fam][1] for lr in FAMILIES[fam][0]]
    if peft:
        out += [(PEFT, lr, proto) for lr in PEFT_LRS] + [(FLOAT64, PEFT_LRS[-1], proto)]
    return out


def run_all(todo: list[tuple[Variant, float, Protocol]], workers: int, base: str, data: Any) -> list[dict]:
    """Every run in ``workers`` single-thread processes (spawned: no forked OpenMP state)."""
    ctx = multiprocessing.get_context("spawn")
    runs = []
    with ctx.Pool(workers, initializer=init_worker, initargs=(base, data.train, data.eval)) as pool:
        for i, run in enumerate(pool.imap_unordered(fine_tune, todo), 1):
            print(f"[{i}/{len(todo)}] {run['variant']:<28} lr={run['lr']:<7g} final eval loss "
                  f"{run['final_eval_loss']:.4f}  ({run['seconds']:.0f} s)", flush=True)  # fmt: skip
            runs.append(run)
    order = {(v.name, lr): i for i, (v, lr, _) in enumerate(todo)}
    return sorted(runs, key=lambda r: order[(r["variant"], r["lr"])])


def steps_to(run: dict, target: float) -> int | None:
    """The first eval step at which the run's eval loss is <= target."""
    return next((step for step, loss in run["eval_curve"] if loss <= target), None)


def summarise(runs: list[dict], adamw_best: float) -> list[dict[str, Any]]:
    """Per variant: best, worst, worst/best, LRs within 1% of best, steps to AdamW's (and its base's) best."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_variant[run["variant"]].append(run)
    plain_best = {v[0].optimizer: min(r["final_eval_loss"] for r in by_variant[v[0].name]) for _, v in
                  FAMILIES.values() if v[0].name in by_variant}  # fmt: skip
    rows = []
    for name, group in by_variant.items():
        finals = [r["final_eval_loss"] for r in group]
        best, worst = min(finals), max(finals)
        best_run = group[finals.index(best)]
        reach = [s for r in group if (s := steps_to(r, adamw_best)) is not None]
        reach_plain = [
            s for r in group if (s := steps_to(r, plain_best.get(r["optimizer"], -math.inf))) is not None
        ]
        rows.append({
            "variant": name,
            "lrs": f"{min(r['lr'] for r in group):g}..{max(r['lr'] for r in group):g}",
            "best": best,
            "best_lr": best_run["lr"],
            "worst": worst,
            "worst/best": worst / best,
            "lrs_within_1pct": sum(f <= 1.01 * best for f in finals),
            "steps_to_adamw_best": min(reach) if reach else None,
            "steps_to_plain_best": min(reach_plain) if reach_plain else None,
            "target_met": worst / best <= TARGET_RATIO and best <= adamw_best + TARGET_SLACK,
        })  # fmt: skip
    return rows


def cross_check(runs: list[dict]) -> list[dict[str, Any]]:
    """PEFT's optimizer, and ours with float64 solves, against ours (float32) at the same LR and delta.

    The float64 row is the noise floor: how far rounding alone moves a 300-step run at that LR.
    """
    reference = FAMILIES["adamw"][1][1]  # ours, absolute 1e-2, float32: what PEFT implements
    ours = {r["lr"]: r for r in runs if r["variant"] == reference.name}
    rows = []
    for run in (r for r in runs if r["variant"] in (PEFT.name, FLOAT64.name)):
        mine = ours.get(run["lr"])
        if mine is None:
            continue
        gaps = [abs(a[1] - b[1]) for a, b in zip(run["eval_curve"], mine["eval_curve"], strict=False)]
        rows.append({"run": run["variant"], "lr": run["lr"], "final": run["final_eval_loss"],
                     "ours_final": mine["final_eval_loss"], "max_abs_gap_eval_curve": max(gaps),
                     "gap_first_eval": gaps[1] if len(gaps) > 1 else None})  # fmt: skip
    return rows


def plot(runs: list[dict], families: list[str], curve_lrs: list[float]) -> None:
    """Final eval loss vs LR per family (log x); eval-loss curves of the AdamW family at ``curve_lrs``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(families) + len(curve_lrs), figsize=(5.2 * (len(families) + len(curve_lrs)), 4.4)
    )
    start = min(r["eval_curve"][0][1] for r in runs)
    for ax, fam in zip(axes, families, strict=False):
        for variant in FAMILIES[fam][1] + ([PEFT] if fam == PEFT.optimizer else []):
            group = [r for r in runs if r["variant"] == variant.name]
            xs = [r["lr"] for r in group]
            ys = [r["final_eval_loss"] if math.isfinite(r["final_eval_loss"]) else math.nan for r in group]
            style = (
                {"marker": "x", "linestyle": "none", "markersize": 10} if variant is PEFT else {"marker": "o"}
            )
            ax.plot(xs, ys, label=variant.name, **style)
        ax.set(xscale="log", xlabel="learning rate", ylabel="final eval loss (nats/token)", title=fam)
        ax.set_ylim(top=start + 0.2)
        ax.legend(fontsize=7)
    for ax, lr in zip(axes[len(families) :], curve_lrs, strict=True):
        for run in (
            r for r in runs if r["lr"] == lr and r["optimizer"] == "adamw" and r["preconditioner"] != "peft"
        ):
            steps, losses = zip(*run["eval_curve"], strict=True)
            ax.plot(steps, losses, label=run["variant"])
        ax.set(xlabel="step", ylabel="eval loss", title=f"AdamW family, lr {lr:g}")
        ax.set_ylim(top=start + 0.2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "preconditioner_usefulness.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    parser.add_argument("--workers", type=int, default=2, help="single-thread worker processes")
    parser.add_argument("--families", default="adamw,sgd", help="comma-separated: adamw, sgd")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT cross-check runs")
    args = parser.parse_args()
    families = args.families.split(",")
    start = time.perf_counter()
    shape, proto = BaseShape(), Protocol(steps=args.steps)
    base = ensure_base(shape)
    data = fine_tune_data(AutoTokenizer.from_pretrained(base), proto.block, 0.15, 32, proto.seed)
    runs = run_all(
        tasks(families, proto, not args.no_peft and "adamw" in families), args.workers, str(base), data
    )
    adamw = [r["final_eval_loss"] for r in runs if r["variant"] == "AdamW"]
    adamw_best = min(adamw) if adamw else -math.inf
    for run in runs:
        run["steps_to_adamw_best"] = steps_to(run, adamw_best)
    print_table(runs, ["variant", "lr", "final_eval_loss", "steps_to_adamw_best", "fallbacks", "seconds"])
    print()
    summary = summarise([r for r in runs if r["variant"] not in (PEFT.name, FLOAT64.name)], adamw_best)
    print_table(summary, list(summary[0]))
    check = cross_check(runs)
    if check:
        print()
        print_table(check, list(check[0]))
    settings = {"base": asdict(shape), "protocol": asdict(proto), "adapter": "lora r=8 alpha=16 all-linear",
                "eval_blocks": len(data.eval), "lrs": {f: FAMILIES[f][0] for f in families},
                "workers": args.workers, "delta_min": 1e-8, "target": {"worst/best": TARGET_RATIO,
                "best_slack_nats": TARGET_SLACK}}  # fmt: skip
    plot(runs, families, [lr for lr in (3e-3, 3e-2) if lr in ADAMW_LRS and "adamw" in families])
    wall = time.perf_counter() - start
    path = write_results("preconditioner_usefulness", {"settings": settings, "data": data.fingerprint,
                         "summary": summary, "cross_check": check, "runs": runs, "wall_s": wall})  # fmt: skip
    print(f"\n{len(runs)} runs in {wall / 60:.1f} min; wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
