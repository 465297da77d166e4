"""What the Riemannian preconditioner costs per optimizer step, next to PEFT's implementation.

    python -m bench.preconditioner_overhead [--quick]

For each model (the demo's tiny Llama, and a ~110M-parameter random-init Llama with 84 LoRA pairs) and
rank (8, 16, 64), four variants train side by side in one process: ours with the preconditioner off and
on, and PEFT's LoRA with plain AdamW and with ``create_riemannian_optimizer``. A step is forward, backward,
optimizer step and zero_grad. The variants' steps are interleaved in a shuffled order each round, so load
from other processes falls on all of them alike; the overhead is the ratio of median step times.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_riemannian_optimizer
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import RESULTS, print_table, write_results
from trainer.adapters import freeze_base, inject_adapters
from trainer.config import AdapterConfig
from trainer.optim import RiemannianPreconditioner


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
LARGE = ModelSpec("llama-110M (84 pairs)", 768, 2048, 12, 12, 16000, 2, 128)


def build_base(spec: ModelSpec) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).train()


Step = Callable[[torch.Tensor], None]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    def run(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def variants(base: LlamaForCausalLM, rank: int) -> dict[str, Step]:
    out = {}
    for precondition in (False, True):
        ours = copy.deepcopy(base)
        inject_adapters(ours, AdapterConfig(rank=rank, alpha=2 * rank))
        freeze_base(ours)
        if precondition:
            RiemannianPreconditioner(1e-2).attach(ours)
        params = [p for p in ours.parameters() if p.requires_grad]
        out[f"ours {'on' if precondition else 'off'}"] = _step(ours, torch.optim.AdamW(params, lr=1e-4))
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


def measure(spec: ModelSpec, rank: int, rounds: int, warmup: int) -> dict[str, float]:
    steps = variants(build_base(spec), rank)
    times: dict[str, list[float]] = {name: [] for name in steps}
    gen = torch.Generator().manual_seed(0)
    order = list(steps)
    for i in range(warmup + rounds):
        ids = torch.randint(0, spec.vocab, (spec.batch, spec.length), generator=gen)
        random.Random(i).shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name](ids)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": spec.name, "rank": rank, "rounds": rounds,
        **{f"{name} s": med[name] for name in steps},
        "ours overhead %": 100 * (med["ours on"] / med["ours off"] - 1),
        "peft overhead %": 100 * (med["peft on"] / med["peft off"] - 1),
    }  # fmt: skip


def plot(rows: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({str(r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sub = [r for r in rows if r["model"] == model]
        x = range(len(sub))
        ax.bar(
            [i - 0.2 for i in x],
            [r["ours overhead %"] for r in sub],
            0.4,
            label="ours (batched, in backward)",
        )
        ax.bar([i + 0.2 for i in x], [r["peft overhead %"] for r in sub], 0.4, label="PEFT (pinv per layer)")
        ax.set_xticks(list(x), [f"r={r['rank']}" for r in sub])
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(model)
        ax.set_ylabel("step time overhead (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "preconditioner_overhead.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model only, few rounds (a smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    plan = [(TINY, 30)] if args.quick else [(TINY, 60), (LARGE, 12)]
    rows = []
    for spec, rounds in plan:
        for rank in (8, 16, 64):
            rows.append(measure(spec, rank, args.rounds or rounds, warmup=3))
            print_table(rows[-1:], list(rows[-1]))
    columns = ["model", "rank", "ours off s", "ours on s", "ours overhead %", "peft off s", "peft on s",
               "peft overhead %"]  # fmt: skip
    print()
    print_table(rows, columns)
    path = write_results("preconditioner_overhead" + ("_quick" if args.quick else ""), {"rows": rows})
    plot(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
