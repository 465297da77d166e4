"""The project's training step against HF Trainer + PEFT, side by side on the same model and data.

    python -m bench.peers [--model demo|30m|1b ...] [--base fp32|nf4 ...] [--precondition off|on ...]
                          [--rounds 3] [--steps 6] [--warmup 2] [--device cpu|cuda] [--compile] [--packing]

A random-init Llama of each size (a transformers LlamaConfig; the tokenizer trained on data/tiny, as the
demo's base is built: trainer.model.tiny) is saved once under bench/.cache/peers/. Both sides load that
directory, train on the same batches (the project's data plan on data/tiny: batch 8, max_seq_len 192,
padded to the longest row; HF's Trainer is handed those very batches in order), LoRA r8 alpha 16 on every
linear layer but the head, AdamW lr 1e-3 constant, clip 1.0, one process:
- project: the config built as the CLI would (local backend, DeepSpeed ZeRO-2 over a world of one, fp32
  on CPU, bf16 on CUDA), stepped through ``trainer.loop.timed_step`` plus the loop's per-step reads
  (gradient norm, learning rate), as ``trainer.loop.train`` does;
- hf: ``AutoModelForCausalLM.from_pretrained`` (with the same BitsAndBytesConfig for NF4), PEFT
  ``get_peft_model(LoraConfig(target_modules="all-linear"))``, ``Trainer.train`` with logging every step;
  with the preconditioner, PEFT's ``create_riemannian_optimizer`` (reg 1e-2, the project's delta).
PEFT's adapter weights are set to the project's initial ones (both draw A from kaiming-uniform, from
different random streams), so the two train the same function from the same start on the same data and
their losses are comparable step by step.

Each round builds every variant afresh, in a shuffled order, times ``--steps`` steps after ``--warmup``
untimed ones and frees it, so a variant's peak memory is its own: peak ``RssAnon`` of the process while
it trains, minus ``RssAnon`` just before it was built (file-backed pages of the memory-mapped checkpoint
are not counted; on CUDA, ``torch.cuda.max_memory_allocated``). A step's time is the wall time from the
end of the step before to the end of this one: the HF side between Trainer ``on_step_end`` callbacks
(batch fetch, step, its logging), the project's over the same work. Reported per variant: the median step
time over all rounds; tokens/s (non-pad input tokens per step over the round's median step, so that a
spike of another process's load moves one step and not the round; the median over rounds); the final
step's loss (and its difference to HF's); peak memory; the untimed warm-up steps' seconds of round 1
(compilation, with --compile); and the ratio project / HF of tokens/s: the median over rounds of that
round's ratio, with its min and max. The JSON keeps every step's seconds.
On CUDA also the MFU: 4 * N * tokens/s / peak bf16 FLOP/s, N the base's parameters without embeddings
(forward 2N and the input gradient 2N per token; a frozen base has no weight gradient; attention left out).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import itertools
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.device import select_accelerator

# DeepSpeed picks its accelerator when first imported; --device decides before anything imports it.
_device_arg = "cuda" if "cuda" in sys.argv else "cpu"
select_accelerator(_device_arg == "cuda")

import torch  # noqa: E402

from bench.common import RESULTS, print_table, write_results  # noqa: E402
from bench.memory_load import AnonSampler  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer.config import RunConfig, TinyModelSpec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache" / "peers"
DATA = ROOT / "data" / "tiny"


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int


SIZES = {
    "demo": Size(128, 256, 2, 4, 2),  # the demo's base (configs/tiny-cpu.yaml), 0.6M
    "30m": Size(512, 1376, 8, 8, 8),  # 26M without embeddings
    "1b": Size(2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape, 0.97B without embeddings
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per NVIDIA's data sheets


def model_dir(name: str) -> Path:
    from trainer.model import ensure_tiny_model

    s = SIZES[name]
    spec = TinyModelSpec(
        hidden_size=s.hidden, intermediate_size=s.intermediate, num_layers=s.layers, num_heads=s.heads,
        num_kv_heads=s.kv_heads, vocab_size=1024, tokenizer_corpus=[str(DATA / "train.jsonl")],
    )  # fmt: skip
    path = CACHE / name
    ensure_tiny_model(str(path), spec)
    return path


@dataclass(frozen=True)
class Setup:
    model: str
    base: str  # fp32 | nf4 (the base's storage; compute is fp32 on CPU, bf16 on CUDA)
    precondition: bool
    device: str
    steps: int
    warmup: int
    lr: float = 1e-3


def run_config(setup: Setup, path: Path, out: Path, *overrides: str) -> RunConfig:
    raw = {
        "model": {"path": str(path), "quantization": "nf4" if setup.base == "nf4" else "none"},
        "adapter": {"method": "lora", "rank": 8, "alpha": 16, "target_modules": "all-linear"},
        "optim": {"lr": setup.lr, "preconditioner": "riemannian" if setup.precondition else "none"},
        "data": {"train_path": str(DATA / "train.jsonl"), "max_seq_len": 192},
        "train": {
            "max_steps": setup.warmup + setup.steps, "micro_batch_size": 8, "sample_prompts": 0,
            "dtype": "bf16" if setup.device == "cuda" else "fp32",
        },
        "distributed": {"backend": "local", "zero_stage": 2, "use_gpu": setup.device == "cuda"},
        "tracking": {"enabled": False},
        "output": {"dir": str(out)},
    }  # fmt: skip
    return config_lib.validate(config_lib.apply_overrides(raw, list(overrides)))


StepTimes = tuple[list[float], list[float], list[int]]  # seconds, losses, tokens per step


class Project:
    """The project's model, optimizer and DeepSpeed engine as the worker builds them (trainer.worker)."""

    def __init__(self, cfg: RunConfig) -> None:
        from trainer.data.build import build_data
        from trainer.engine import build_engine
        from trainer.model.load import load_tokenizer, prepare_model
        from trainer.optim import build_optimizer, build_scheduler

        device = torch.device("cuda" if cfg.distributed.use_gpu else "cpu")
        self.model = prepare_model(cfg, device)
        optimizer, _ = build_optimizer(self.model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.engine = build_engine(self.model, optimizer, scheduler, cfg)
        self.plan, _ = build_data(cfg, load_tokenizer(cfg.model.path), rank=0, world_size=1)
        self.cfg = cfg

    def adapter_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from trainer.adapters import adapter_layers

        out = {}
        for name, layer in adapter_layers(self.model):
            adapter: Any = layer.adapter
            out[name] = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())
        return out

    def batches(self, steps: int) -> list[dict[str, torch.Tensor]]:
        return [self.plan.for_step(i).micro_batches[0] for i in range(steps)]

    def train(self, steps: int) -> StepTimes:
        from trainer.engine import global_grad_norm
        from trainer.loop import LoopSettings, timed_step

        settings = LoopSettings(max_steps=steps)
        seconds, losses, tokens = [], [], []
        last = time.perf_counter()
        for step in range(steps):
            batch, loss, _, _ = timed_step(self.engine, self.plan, step, 1, settings)
            global_grad_norm(self.engine), self.engine.get_lr()  # the loop's per-step reads
            now = time.perf_counter()
            seconds.append(now - last)
            losses.append(loss)
            tokens.append(batch.global_tokens)
            last = now
        return seconds, losses, tokens


class HF:
    """HF Trainer + PEFT on the same directory and batches, PEFT's adapters set to the project's."""

    def __init__(self, cfg: RunConfig, batches: list[dict[str, torch.Tensor]], init: dict[str, Any]) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from trainer.model.load import DTYPES, bnb_config

        dtype = DTYPES[cfg.train.dtype]
        device = torch.device("cuda" if cfg.distributed.use_gpu else "cpu")
        base = AutoModelForCausalLM.from_pretrained(
            cfg.model.path, dtype=dtype, quantization_config=bnb_config(cfg.model, dtype, device),
            device_map={"": device}, local_files_only=True,
        )  # fmt: skip
        self.model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, (a, b) in init.items():
                layer: Any = self.model.get_submodule(f"base_model.model.{name}")
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
        if len(init) != sum(1 for n, _ in self.model.named_modules() if n.endswith("lora_A")):
            raise RuntimeError("PEFT adapted other modules than the project")
        self.batches, self.cfg, self.device = batches, cfg, device

    def train(self, steps: int, out: Path) -> StepTimes:
        with _alone():
            return self._train(steps, out)

    def _train(self, steps: int, out: Path) -> StepTimes:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        o = self.cfg.optim
        args = TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=1, learning_rate=o.lr,
            weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=o.grad_clip or 0.0,
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=self.device.type == "cpu",
            bf16=self.cfg.train.dtype == "bf16", dataloader_num_workers=0, disable_tqdm=True,
            train_sampling_strategy="sequential", remove_unused_columns=False, seed=self.cfg.train.seed,
        )  # fmt: skip
        ends: list[float] = []
        losses: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                if not ends:
                    ends.append(time.perf_counter())

            def on_step_end(self, *a: Any, **k: Any) -> None:
                ends.append(time.perf_counter())

            def on_log(self, *a: Any, logs: dict[str, float] | None = None, **k: Any) -> None:
                if logs and "loss" in logs:
                    losses.append(float(logs["loss"]))

        optimizers: Any = (None, None)
        if self.cfg.optim.preconditioner == "riemannian":
            from peft.optimizers import create_riemannian_optimizer

            opt = create_riemannian_optimizer(
                self.model, torch.optim.AdamW, lr=o.lr, reg=self.cfg.optim.delta, betas=o.betas, eps=o.eps
            )
            optimizers = (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
        trainer = Trainer(
            model=self.model, args=args, train_dataset=self.batches[:steps],
            data_collator=lambda rows: rows[0], callbacks=[Clock()], optimizers=optimizers,
        )  # fmt: skip
        trainer.train()
        if isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError("the HF Trainer wrapped its model in DDP: not what one process runs")
        seconds = [b - a for a, b in itertools.pairwise(ends)]
        tokens = [int(b["attention_mask"].sum()) for b in self.batches[:steps]]
        return seconds, losses, tokens


@contextlib.contextmanager
def _alone() -> Iterator[None]:
    """Without the torchrun variables the project's world of one set: with them accelerate (under the HF
    Trainer) would wrap the model in DDP as if launched on several processes, which HF alone does not."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass
class Result:
    seconds: list[float]
    losses: list[float]
    tokens: list[int]
    peak_bytes: int


def measure(build: Callable[[], Any], train: Callable[[Any], StepTimes], device: str) -> Result:
    """Build, train and free one variant; its peak memory is its own (see the module docstring)."""
    gc.collect()
    sampler = AnonSampler()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = AnonSampler.now()
    sampler.enter("run")
    runner = build()
    seconds, losses, tokens = train(runner)
    peaks = sampler.stop()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peaks["run"] - before
    del runner
    gc.collect()
    return Result(seconds, losses, tokens, peak)


def variants(setup: Setup, path: Path, work: Path, extra: list[str]) -> Iterator[tuple[str, RunConfig]]:
    yield "project", run_config(setup, path, work / "project")
    if "compile" in extra:
        yield "project compile", run_config(setup, path, work / "compile", "train.compile=true")
    if "packing" in extra:
        yield "project packed", run_config(setup, path, work / "packed", "data.packing=true")


def compare(setup: Setup, rounds: int, extra: list[str]) -> list[dict[str, Any]]:
    path = model_dir(setup.model)
    total = setup.warmup + setup.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs = dict(variants(setup, path, work, extra))
        first = Project(configs["project"])  # the initial adapters and the batches both sides train on
        init, batches = first.adapter_weights(), first.batches(total)
        del first
        results: dict[str, list[Result]] = {name: [] for name in [*configs, "hf"]}
        for r in range(rounds):
            order = list(results)
            random.Random(r).shuffle(order)
            for name in order:
                if name == "hf":
                    results[name].append(measure(
                        lambda: HF(configs["project"], batches, init), lambda h: h.train(total, work / "hf"),
                        setup.device,
                    ))  # fmt: skip
                else:
                    results[name].append(measure(
                        functools.partial(Project, configs[name]), lambda p: p.train(total), setup.device
                    ))  # fmt: skip
    return summarize(setup, results, path)


def non_embedding_params(path: Path) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path, local_files_only=True)
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    per_layer = 2 * c.hidden_size * (c.hidden_size + kv) + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer


def summarize(setup: Setup, results: dict[str, list[Result]], path: Path) -> list[dict[str, Any]]:
    w = setup.warmup

    def tokens_per_s(res: Result) -> float:
        # the round's median step, not its sum: a spike of another process's load (shared machines) moves
        # one step, and the median of the round ignores it
        return statistics.mean(res.tokens[w:]) / statistics.median(res.seconds[w:])

    params = non_embedding_params(path)
    peak_flops = next(
        (
            f
            for k, f in PEAK_BF16_FLOPS.items()
            if setup.device == "cuda" and k in torch.cuda.get_device_name()
        ),
        None,
    )
    rows = []
    for name, runs in results.items():
        ratios = [tokens_per_s(p) / tokens_per_s(h) for p, h in zip(runs, results["hf"], strict=True)]
        tps = statistics.median(tokens_per_s(r) for r in runs)
        row: dict[str, Any] = {
            "model": setup.model, "base": setup.base, "precond": "on" if setup.precondition else "off",
            "variant": name, "step s": statistics.median(s for r in runs for s in r.seconds[w:]),
            "tokens/s": tps, "final loss": runs[-1].losses[-1],
            "loss - hf": runs[-1].losses[-1] - results["hf"][-1].losses[-1],
            "peak MB": statistics.median(r.peak_bytes for r in runs) / 1e6,
            "warmup s": sum(runs[0].seconds[:w]),  # round 1's untimed steps: compilation, when compiled
            "x hf": statistics.median(ratios), "x hf min": min(ratios), "x hf max": max(ratios),
            "losses": runs[-1].losses, "rounds": len(runs), "seconds": [r.seconds for r in runs],
            "peak_bytes": [r.peak_bytes for r in runs],
        }  # fmt: skip
        if peak_flops:
            row["mfu %"] = 100 * 4 * params * tps / peak_flops
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["base"], r["precond"]) for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "hf"))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups)), 3.5))
    width = 0.8 / len(names)
    for j, variant in enumerate(names):
        sub = [next(r for r in rows if (r["model"], r["base"], r["precond"]) == g and r["variant"] == variant)
               for g in groups]  # fmt: skip
        x = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        med = [r["x hf"] for r in sub]
        err = [[r["x hf"] - r["x hf min"] for r in sub], [r["x hf max"] - r["x hf"] for r in sub]]
        ax.bar(x, med, width, yerr=err, capsize=3, label=variant)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [f"{m}\n{b}, precond {p}" for m, b, p in groups], fontsize=8)
    ax.set_ylabel("tokens/s / HF Trainer + PEFT\n(median, min-max over rounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


COLUMNS = ["model", "base", "precond", "variant", "step s", "tokens/s", "final loss", "loss - hf", "peak MB",
           "warmup s", "x hf", "x hf min", "x hf max"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(SIZES), action="append", help="sizes (default: demo 30m)")
    parser.add_argument("--base", choices=["fp32", "nf4"], action="append", help="default: both")
    parser.add_argument("--precondition", choices=["off", "on"], action="append", help="default: both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; 4 with --compile)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=_device_arg)
    parser.add_argument("--compile", action="store_true", help="add the project with train.compile")
    parser.add_argument("--packing", action="store_true", help="add the project with data.packing")
    parser.add_argument("--name", default="peers", help="results go to bench/results/<name>.json and .png")
    args = parser.parse_args()
    args.warmup = args.warmup or (4 if args.compile else 2)  # compiled: a graph per input kind and shape
    if min(args.rounds, args.steps, args.warmup) < 1:
        parser.error("--rounds, --steps and --warmup must be at least 1")
    from trainer.engine import init_distributed

    init_distributed(args.device == "cuda")  # a world of one, for DeepSpeed
    extra = [k for k in ("compile", "packing") if getattr(args, k)]
    rows = []
    for model in args.model or ["demo", "30m"]:
        for base in args.base or ["fp32", "nf4"]:
            for precondition in args.precondition or ["off", "on"]:
                setup = Setup(model, base, precondition == "on", args.device, args.steps, args.warmup)
                rows += compare(setup, args.rounds, extra)
                print_table(rows[-len(extra) - 2 :], COLUMNS)
                write_results(args.name, {"args": vars(args), "rows": rows})  # so far, should a run stop
    columns = COLUMNS + (["mfu %"] if any("mfu %" in r for r in rows) else [])
    print()
    print_table(rows, columns)
    path = write_results(args.name, {"args": vars(args), "rows": rows})
    plot(rows, args.name)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
