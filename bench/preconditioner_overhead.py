"""What the Riemannian preconditioner costs per optimizer step, next to PEFT's implementation.

    python -m bench.preconditioner_overhead [--quick] [--workload tiny|110m-256|110m-1024] [--ranks R ...]

For each workload (the demo's tiny Llama; a ~110M-parameter random-init Llama with 84 LoRA pairs at 256
and at 1024 tokens per step) and rank (8, 16, 64), four variants train side by side in one process: ours
with the preconditioner off and on, and PEFT's LoRA with plain AdamW and with
``create_riemannian_optimizer``. A step is forward, backward, optimizer step and zero_grad. Each round runs
every variant once, in a shuffled order; the overhead is the median over rounds of that round's on/off
step-time ratio (pairs measured seconds apart, so drifting load from other processes cancels), with its
interquartile range. That difference of two noisy step times cannot resolve a fraction of a percent on a
shared machine, so the time spent inside each preconditioner's own code is also clocked during the "on"
steps: ours in its gradient hooks (Gram matrices, the batched factorisation, the preconditioned
gradients), PEFT's in its step (a pinv per factor, the preconditioned gradients). It is reported in
milliseconds and as a share of the step ("inside %"), and the two implementations are compared by the
median of the per-round ratio of their times ("ours / peft inside"): clocked in the same round, seconds
apart, both slow down together when the machine has a slow spell, so the ratio is the steadiest number.

The preconditioner's work is four r x r-by-r x n products per pair (two Gram matrices, formed together at
the start of backward, and two preconditioned gradients) plus one batched Cholesky: a fixed cost per step,
while the model's own work grows with the tokens per step. Hence the two token budgets of the 110M model.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_riemannian_optimizer
from peft.optimizers import riemannian as peft_riemannian
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import RESULTS, print_table, write_results
from trainer.adapters import freeze_base, inject_adapters
from trainer.config import AdapterConfig
from trainer.optim import RiemannianPreconditioner
from trainer.optim.riemannian import _PairSlot


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    length: int


TINY = ModelSpec("tiny (0.6M, 14 pairs)", 128, 256, 2, 4, 1024, 8, 128)
LARGE = ModelSpec("llama-110M (84 pairs), 256 tokens/step", 768, 2048, 12, 12, 16000, 2, 128)
LARGE_BATCH = ModelSpec("llama-110M (84 pairs), 1024 tokens/step", 768, 2048, 12, 12, 16000, 8, 128)


# name -> (workload, default rounds): a round trains all four variants once
WORKLOADS = {"tiny": (TINY, 60), "110m-256": (LARGE, 12), "110m-1024": (LARGE_BATCH, 6)}


def build_base(spec: ModelSpec) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).train()


Step = Callable[[list[torch.Tensor]], None]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    def run(micro_batches: list[torch.Tensor]) -> None:
        for ids in micro_batches:
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def variants(base: LlamaForCausalLM, rank: int, accum: int) -> dict[str, Step]:
    """Ours off and on (as the trainer builds it: watching the optimizer, so forming the systems once per
    step), PEFT off and on; with accumulation also ours forming them at every micro-batch."""
    out = {}
    for name in ("ours off", "ours on") + (("ours per-micro-batch",) if accum > 1 else ()):
        ours = copy.deepcopy(base)
        inject_adapters(ours, AdapterConfig(rank=rank, alpha=2 * rank))
        freeze_base(ours)
        optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
        if name != "ours off":
            preconditioner = RiemannianPreconditioner(1e-2)
            preconditioner.attach(ours)
            if name == "ours on":
                preconditioner.watch(optimizer)
        out[name] = _step(ours, optimizer)
    for precondition in (False, True):
        peft = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
        )
        opt = (
            create_riemannian_optimizer(peft, torch.optim.AdamW, lr=1e-4, reg=1e-2)
            if precondition
            else torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
        )
        out[f"peft {'on' if precondition else 'off'}"] = _step(peft, opt)
    return out


def _quartiles(ratios: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return 100 * (q1 - 1), 100 * (med - 1), 100 * (q3 - 1)


class _Clock:
    """Seconds spent in each implementation's preconditioner since the last reset: ours in its gradient
    hooks (factorisation included), PEFT's in its ``step`` (pinv and preconditioned gradients).

    Our hooks are bound when the preconditioner is attached: enter the clock before building the models."""

    def __init__(self) -> None:
        self.seconds = {"ours": 0.0, "peft": 0.0}
        self._targets: list[tuple[type, str, str]] = [
            (_PairSlot, "precondition_a", "ours"),
            (_PairSlot, "precondition_b", "ours"),
            (peft_riemannian._RiemannianPreconditioner, "step", "peft"),
        ]
        self._saved = [getattr(cls, name) for cls, name, _ in self._targets]

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def _timed(self, fn: Callable[..., Any], impl: str) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[impl] += time.perf_counter() - start

        return timed

    def __enter__(self) -> _Clock:
        for (cls, name, impl), fn in zip(self._targets, self._saved, strict=True):
            setattr(cls, name, self._timed(fn, impl))
        return self

    def __exit__(self, *exc: object) -> None:
        for (cls, name, _), fn in zip(self._targets, self._saved, strict=True):
            setattr(cls, name, fn)


def measure(spec: ModelSpec, rank: int, rounds: int, warmup: int, accum: int = 1) -> dict[str, Any]:
    with _Clock() as clock:
        steps = variants(build_base(spec), rank, accum)
        times: dict[str, list[float]] = {name: [] for name in steps}
        inside: dict[str, list[float]] = {name: [] for name in steps if not name.endswith("off")}
        seconds: dict[str, list[float]] = {name: [] for name in inside}
        gen = torch.Generator().manual_seed(0)
        order = list(steps)
        for i in range(warmup + rounds):
            micro_batches = [
                torch.randint(0, spec.vocab, (spec.batch, spec.length), generator=gen) for _ in range(accum)
            ]
            random.Random(i).shuffle(order)
            for name in order:
                clock.reset()
                start = time.perf_counter()
                steps[name](micro_batches)
                elapsed = time.perf_counter() - start
                if i >= warmup:
                    times[name].append(elapsed)
                    if name in inside:
                        spent = clock.seconds[name.split()[0]]
                        seconds[name].append(spent)
                        inside[name].append(100 * spent / elapsed)
    row: dict[str, Any] = {"model": spec.name, "rank": rank, "rounds": rounds, "accumulation": accum}
    row |= {f"{name} s": statistics.median(t) for name, t in times.items()}
    for name in inside:
        label = name.removesuffix(" on")
        row[f"{label} inside ms"] = 1000 * statistics.median(seconds[name])
        row[f"{label} inside %"] = statistics.median(inside[name])
    # both clocked in the same round, seconds apart: a slow spell of the machine slows both
    row["ours / peft inside"] = statistics.median(
        o / p for o, p in zip(seconds["ours on"], seconds["peft on"], strict=True)
    )
    for impl in ("ours", "peft"):
        ratios = [on / off for on, off in zip(times[f"{impl} on"], times[f"{impl} off"], strict=True)]
        q1, med, q3 = _quartiles(ratios)
        row |= {f"{impl} overhead %": med, f"{impl} q1 %": q1, f"{impl} q3 %": q3}
    return row


def plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["model"] == model]
        x = range(len(sub))
        bars = (("ours", -0.2, "ours (batched Cholesky)"), ("peft", 0.2, "PEFT (pinv per layer)"))
        for impl, shift, label in bars:
            med = [r[f"{impl} overhead %"] for r in sub]
            spread = [[r[f"{impl} overhead %"] - r[f"{impl} q1 %"] for r in sub],
                      [r[f"{impl} q3 %"] - r[f"{impl} overhead %"] for r in sub]]  # fmt: skip
            ax.bar([i + shift for i in x], med, 0.4, yerr=spread, capsize=3, label=label)
        for impl, shift in (("ours", -0.2), ("peft", 0.2)):
            inside = [r[f"{impl} inside %"] for r in sub]
            ax.plot([i + shift for i in x], inside, "k_", markersize=16, mew=2,
                    label="time inside its code" if impl == "ours" else None)  # fmt: skip
        ax.set_xticks(list(x), [f"r={r['rank']}" for r in sub])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(model, fontsize=9)
        ax.set_ylabel("step time overhead (%), median and IQR")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model only, few rounds (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per workload and rank")
    parser.add_argument(
        "--workload", choices=sorted(WORKLOADS), action="append",
        help="measure only these (repeatable; results go to preconditioner_overhead_<workloads>.json)",
    )  # fmt: skip
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument(
        "--accum", type=int, default=1,
        help="micro-batches per optimizer step (> 1 adds ours forming the systems at every micro-batch)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.accum < 1 or (args.rounds is not None and args.rounds < 1) or min(args.ranks) < 1:
        parser.error("--accum, --rounds and --ranks must be at least 1")
    torch.set_num_threads(torch.get_num_threads())
    if args.quick:
        plan, name = [(TINY, 30)], "preconditioner_overhead_quick"
    elif args.workload:
        plan = [WORKLOADS[w] for w in args.workload]
        name = "preconditioner_overhead_" + "_".join(args.workload)
    else:
        plan, name = list(WORKLOADS.values()), "preconditioner_overhead"
    if args.accum > 1:
        name += f"_accum{args.accum}"
    rows = []
    for spec, rounds in plan:
        for rank in args.ranks:
            rows.append(measure(spec, rank, args.rounds or rounds, warmup=2, accum=args.accum))
            print_table(rows[-1:], list(rows[-1]))
    columns = ["model", "rank", "ours off s", "ours inside ms", "ours inside %", "peft inside ms",
               "peft inside %", "ours / peft inside", "ours overhead %", "peft overhead %"]  # fmt: skip
    if args.accum > 1:
        columns[5:5] = ["ours per-micro-batch inside ms", "ours per-micro-batch inside %"]
    print()
    print_table(rows, columns)
    path = write_results(name, {"rows": rows})
    plot(rows, name)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
