"""The plan: every memory component of a run, per rank and per host, and whether it fits.

A rank's peak is what it holds for the whole run (the base's share, the adapters' ZeRO states) plus the
largest of its transient phases: loading (one unit whole while it is partitioned, one full-precision
tensor in flight), the forward/backward of a micro-batch (activations, loss buffer, DeepSpeed's reduce
buckets, under ZeRO-3 the gathered layer and head and the prefetched layer, one dequantised 4-bit
weight) and the optimizer step (the float32 gradient partition, the all-gather bucket). Then the fixed
costs of a process on the device (trainer.plan.hardware). Components come from trainer.plan.counts
(meta build), trainer.plan.activations (meta run of one layer) and trainer.plan.zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config import RunConfig
from trainer.loss import chunk_tokens_for
from trainer.model.load import DTYPES
from trainer.model.vocab import EMBED_CHUNK_TOKENS, splits
from trainer.plan import hardware as hw
from trainer.plan.activations import LayerActivations, measure_layer
from trainer.plan.counts import ModelCounts, count_model
from trainer.plan.zero import adapter_states, shard

PREFETCH_ELEMENTS = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size (engine.py sets none)
LOSS_CHUNKED_BYTES_PER_LOGIT = 10  # float32 logits + float32 softmax + its bf16 cast (trainer/loss.py)
LOSS_UNCHUNKED_BYTES_PER_LOGIT = 14  # bf16 logits, float32 copy, saved log-softmax, its gradient pair


@dataclass(frozen=True)
class Component:
    """One line of the table: bytes per rank (``where``: device or host), and in which phase it peaks."""

    section: str
    name: str
    bytes: int
    phase: str  # run (held throughout), load, train (a micro-batch's forward/backward), step, fixed
    where: str = "device"
    note: str = ""


@dataclass
class Plan:
    """A run's memory per rank and per host, and the verdict against ``devices``."""

    world: int
    devices: hw.Devices
    seq_len: int
    micro_batch: int
    components: list[Component]
    ranks_per_host: int
    cpu_ram: int | None = None
    notes: list[str] = field(default_factory=list)
    rank0_file_backed: int = 0  # CPU only: bytes rank 0 holds in the checkpoint's file pages, not anonymous

    def phase_total(self, phase: str, where: str = "device") -> int:
        return sum(c.bytes for c in self.components if c.phase == phase and c.where == where)

    @property
    def peak_phase(self) -> str:
        return max(("load", "train", "step"), key=self.phase_total)

    @property
    def allocated_peak(self) -> int:
        """Bytes the framework allocates at the peak (what torch.cuda.max_memory_allocated would say)."""
        return self.phase_total("run") + self.phase_total(self.peak_phase)

    @property
    def device_peak(self) -> int:
        """What the device must hold: the allocated peak, the allocator's reserve and the fixed costs."""
        return self.allocated_peak + self.phase_total("reserve") + self.phase_total("fixed")

    def rank_peak_bytes(self, rank: int = 0) -> int:
        """A rank's anonymous peak. Every rank holds the same shares (DeepSpeed pads partitions to equal
        sizes), except on a CPU run below ZeRO-3: there the unquantised tensors the loader reads in the
        checkpoint's own dtype are never copied (``.to`` is a no-op) and stay pages of the memory-mapped
        file on rank 0, while DeepSpeed's broadcast at initialize writes into them on every other rank,
        which turns them into private, anonymous copies (copy-on-write)."""
        return self.device_peak - (self.rank0_file_backed if rank == 0 else 0)

    @property
    def host_per_rank(self) -> int:
        return sum(c.bytes for c in self.components if c.where == "host")

    @property
    def host_peak(self) -> int:
        """Host RAM of one host: its ranks' processes and what they keep there (not the page cache)."""
        if self.devices.kind == "cpu":
            return self.device_peak * self.ranks_per_host
        return self.host_per_rank * self.ranks_per_host

    @property
    def fits_device(self) -> bool:
        return self.device_peak <= self.devices.memory

    @property
    def fits_host(self) -> bool:
        return self.cpu_ram is None or self.host_peak <= self.cpu_ram

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    @property
    def shortfall(self) -> int:
        """Bytes missing on the tighter of device and host (0 when it fits)."""
        device = max(0, self.device_peak - self.devices.memory)
        host = max(0, self.host_peak - self.cpu_ram) if self.cpu_ram is not None else 0
        return max(device, host)


def plan_config(
    cfg: RunConfig, devices: hw.Devices | None = None, device: str = "cuda", seq_len: int | None = None,
    architecture: str | None = None, cpu_ram: int | None = None, counts: ModelCounts | None = None,
    ranks_per_host: int | None = None, offload_params: bool = False,
) -> Plan:  # fmt: skip
    """The memory plan of ``cfg`` on ``devices`` (default: ``distributed.num_workers`` GPUs of 80 GB,
    or CPU processes when ``device`` is cpu). ``seq_len``: tokens per sequence (default
    ``data.max_seq_len``, the worst case, and every row's length with packing). ``offload_params``: a
    what-if, ZeRO-3 with each rank's partition of the base in host RAM (DeepSpeed's ``offload_param``),
    which this project's configs cannot ask for yet: the advice uses it to say what a plan would take."""
    if devices is None:
        kind = "cpu" if device == "cpu" else "cuda"
        devices = hw.Devices(cfg.distributed.num_workers, cpu_ram or 80 * hw.GB, kind)
    world = devices.count
    seq = seq_len or cfg.data.max_seq_len
    counts = counts or count_model(cfg, architecture)
    acts = measure_layer(cfg, cfg.train.micro_batch_size, seq, architecture)
    components = (
        _base(cfg, counts, world, offload_params)
        + _adapters(cfg, counts, world)
        + _activations(cfg, counts, acts, seq, world)
        + _deepspeed(cfg, counts, world, cfg.train.micro_batch_size * seq)
        + _loading(cfg, counts, world)
    )
    plan = Plan(world, devices, seq, cfg.train.micro_batch_size, components,
                ranks_per_host or world, cpu_ram)  # fmt: skip
    plan.components += _fixed(plan)
    if devices.kind == "cpu" and not _z3(cfg) and _checkpoint_dtype(counts) == DTYPES[cfg.train.dtype]:
        plan.rank0_file_backed = counts.unquantized
    return plan


def _checkpoint_dtype(counts: ModelCounts) -> object:
    """The dtype config.json says the checkpoint's tensors are stored in."""
    import torch

    value = getattr(counts.config, "dtype", None) or getattr(counts.config, "torch_dtype", None)
    return getattr(torch, value) if isinstance(value, str) else value


def _z3(cfg: RunConfig) -> bool:
    return cfg.distributed.zero_stage == 3


def vocab_sharded(cfg: RunConfig, counts: ModelCounts, world: int) -> bool:
    """Whether the loader splits the embedding and head by vocabulary rows (trainer.model.load)."""
    d = cfg.distributed
    return (
        _z3(cfg)
        and d.shard_vocab
        and not cfg.train.liger
        and bool(counts.vocab_units)
        and splits(counts.vocab, world)
    )


def _base(cfg: RunConfig, counts: ModelCounts, world: int, offload: bool = False) -> list[Component]:
    z3 = _z3(cfg) or offload
    packed = sum(shard(u.packed, world) for u in counts.units) if z3 else counts.packed
    unq = sum(shard(u.unquantized, world) for u in counts.units) if z3 else counts.unquantized
    how = f"1/{world} (ZeRO-3)" if z3 else "whole (ZeRO 0-2 keep the frozen base on every rank)"
    quant = cfg.model.quantization == "nf4"
    rows = []
    if quant:
        where = "host" if offload else "device"
        rows.append(Component("base", "4-bit base, packed NF4", packed, "run", where=where,
                              note=how + (", in host RAM (what-if)" if offload else "")))  # fmt: skip
        rows.append(Component("base", "4-bit quantisation constants (absmax, double quant)", counts.constants,
                              "run", note="whole on every rank (quant_state: not partitioned)"))  # fmt: skip
    label = "unquantised parts (embeddings, norms, lm_head)" if quant else "base (unquantised)"
    rows.append(Component("base", label, unq, "run", where="host" if offload else "device",
                          note=f"{cfg.train.dtype}, {how}"))  # fmt: skip
    return rows


def _adapters(cfg: RunConfig, counts: ModelCounts, world: int) -> list[Component]:
    d, a = cfg.distributed, cfg.adapter
    states = adapter_states(
        counts.adapter_params, counts.param_itemsize, d.zero_stage, world, d.offload_optimizer,
        cfg.optim.name, cfg.optim.momentum, _buckets(cfg, counts, world),
    )  # fmt: skip
    what = f"{a.method} r{a.rank}, {counts.adapter_params:,} parameters in {counts.adapted_modules} modules"
    if a.method in ("sara", "mosara"):
        what = f"{a.method} at r_max {a.sara.r_max} (an upper bound), {counts.adapter_params:,} parameters"
    stage = f"ZeRO-{d.zero_stage}"
    rows = [
        Component("adapters", "parameters", states.params, "run", note=f"{what}; {stage}"),
        Component("adapters", "gradients", states.grads, "run", note=stage),
        Component("adapters", "float32 master copy", states.master, "run", note=stage),
        Component("adapters", f"optimizer states ({cfg.optim.name})", states.moments, "run", note=stage),
        Component("adapters", "float32 gradient partition (optimizer step)", states.fp32_grads, "step"),
    ]
    if states.host:
        rows.append(Component("adapters", "offloaded optimizer: master, states, fp32 gradients", states.host,
                              "run", where="host", note="offload_optimizer (pinned)"))  # fmt: skip
    return rows


def loss_buffer(cfg: RunConfig, counts: ModelCounts, tokens: int, sharded: bool = False) -> tuple[int, str]:
    """Bytes of the loss's logits and their gradient at their peak (trainer/loss.py), and how.
    ``sharded``: the head split by vocabulary rows, one chunk of every rank's tokens over this rank's
    rows at a time, as many logits as one rank's chunk over the whole vocabulary (trainer/model/vocab.py)."""
    vocab = counts.vocab
    chunk = chunk_tokens_for(cfg.train.loss_chunk_tokens, counts.config)
    if sharded:
        per = min(chunk or tokens, tokens)
        how = f"vocabulary-sharded, {'chunks of ' + str(chunk) if chunk else 'all'} tokens per rank"
        return per * vocab * LOSS_CHUNKED_BYTES_PER_LOGIT, how
    if chunk:
        return min(chunk, tokens) * vocab * LOSS_CHUNKED_BYTES_PER_LOGIT, f"chunked, {chunk} tokens at a time"
    return tokens * vocab * LOSS_UNCHUNKED_BYTES_PER_LOGIT, "unchunked (train.loss_chunk_tokens: 0 or auto)"


def _activations(
    cfg: RunConfig, counts: ModelCounts, acts: LayerActivations, seq: int, world: int
) -> list[Component]:
    layers = len(counts.layers)
    b = cfg.train.micro_batch_size
    ckpt = cfg.model.gradient_checkpointing
    # without checkpointing each layer keeps what autograd saved; with it, only its input (the
    # previous layer's output), and one layer is recomputed whole in backward
    per_layer = acts.hidden if ckpt else acts.retained
    stack = acts.hidden + layers * per_layer + acts.norm_retained
    quant = cfg.model.quantization == "nf4"
    dequant = (
        max((u.linear4bit_max for u in counts.layers), default=0) * counts.param_itemsize if quant else 0
    )
    recompute = acts.retained if ckpt else 0
    forward = acts.forward_extra + dequant
    backward = recompute + acts.hidden + acts.backward_extra + dequant
    loss, how = loss_buffer(cfg, counts, b * seq, vocab_sharded(cfg, counts, world))
    # the float32 hidden-state gradient the chunked loss fills as it goes
    loss_peak = loss + acts.hidden * 4 // counts.param_itemsize
    transient = max(forward, backward, loss_peak)
    rows = [
        Component("activations", f"saved for backward ({layers} layers)", stack, "train",
                  note=f"{b} x {seq} tokens ({'packed rows' if cfg.data.packing else 'longest row'}), "
                       f"checkpointing {'on' if ckpt else 'off'}, {cfg.model.attn_implementation}, "
                       "no activation offload"),
        Component("activations", "largest transient (layer fwd/bwd, recompute, loss)", transient, "train",
                  note=f"loss {how}" + ("; one dequantised 4-bit weight" if quant else "")),
    ]  # fmt: skip
    return rows


def _buckets(cfg: RunConfig, counts: ModelCounts, world: int) -> int:
    """Elements of the ZeRO buckets in the config trainer.engine builds for this run."""
    from trainer.engine import deepspeed_config  # DeepSpeed imported only when a plan is made

    zero = deepspeed_config(cfg, world, counts.adapter_params)["zero_optimization"]
    return int(zero["reduce_bucket_size"])


def _deepspeed(cfg: RunConfig, counts: ModelCounts, world: int, tokens: int) -> list[Component]:
    d = cfg.distributed
    bucket = _buckets(cfg, counts, world)
    states = adapter_states(counts.adapter_params, counts.param_itemsize, d.zero_stage, world,
                            d.offload_optimizer, cfg.optim.name, cfg.optim.momentum, bucket)  # fmt: skip
    rows = [
        Component("deepspeed", "reduce bucket(s)", states.reduce_buckets, "train",
                  note=f"{bucket:,} elements x {1 + (d.zero_stage == 3)}"),
        Component("deepspeed", "all-gather bucket (ZeRO 1-2)", states.allgather_bucket, "step"),
    ]  # fmt: skip
    if _z3(cfg):
        sharded = vocab_sharded(cfg, counts, world)
        layer = max((u.partitionable for u in counts.layers), default=0)
        gathered = max((u.partitionable for u in counts.gathered_units(sharded)), default=0)
        prefetch = min(layer, PREFETCH_ELEMENTS * counts.param_itemsize)
        what = "ZeRO-3 gathered layer" + ("" if sharded else " or head") + ", and prefetch"
        rows.append(Component("deepspeed", what, gathered + prefetch,
                              "train", note="one unit whole + stage3_prefetch_bucket_size"))  # fmt: skip
        if sharded:
            rows.append(_vocab_exchange(cfg, counts, world, tokens))
    return rows


def _vocab_exchange(cfg: RunConfig, counts: ModelCounts, world: int, tokens: int) -> Component:
    """What the vocabulary-sharded embedding and loss exchange instead of the weights: every rank's
    tokens' vectors (the lookup, chunks of EMBED_CHUNK_TOKENS) or hidden states and their float32
    gradient (the loss, one chunk), whichever is larger."""
    hidden = int(getattr(counts.config, "hidden_size", 0))
    lookup = world * min(tokens, EMBED_CHUNK_TOKENS) * hidden * counts.param_itemsize
    chunk = min(chunk_tokens_for(cfg.train.loss_chunk_tokens, counts.config) or tokens, tokens)
    loss = world * chunk * hidden * (counts.param_itemsize + 4)
    return Component("deepspeed", "vocabulary-sharded exchange (every rank's tokens)", max(lookup, loss),
                     "train", note=f"embedding and head split by rows over {world} ranks")  # fmt: skip


def _loading(cfg: RunConfig, counts: ModelCounts, world: int) -> list[Component]:
    """While loading: one full-precision tensor in flight; under ZeRO-3 the unit being partitioned whole."""
    sharded = vocab_sharded(cfg, counts, world)  # its units read as rows: their share only
    kept = counts.gathered_units(sharded)
    in_flight = max((u.largest_tensor for u in kept), default=0) * counts.param_itemsize
    unit = max((u.partitionable for u in kept), default=0) if _z3(cfg) else 0
    name = "one tensor in flight (+ the unit being partitioned)"
    return [Component("loading", name, in_flight + unit, "load",
                      note="streamed loader (trainer/model/stream.py)")]  # fmt: skip


def _fixed(plan: Plan) -> list[Component]:
    if plan.devices.kind == "cpu":
        return [Component("runtime", "process start-up (torch, DeepSpeed, gloo)", hw.CPU_PROCESS_BYTES,
                          "fixed", note="measured (trainer/plan/hardware.py)"),
                Component("runtime", "heap growth of loading and initialize", hw.CPU_RUNTIME_BYTES, "fixed",
                          note="measured once (trainer/plan/hardware.py)")]  # fmt: skip
    reserve = int(plan.allocated_peak * hw.ALLOCATOR_RESERVE)
    return [
        Component("runtime", "CUDA context", hw.CUDA_CONTEXT_BYTES, "fixed", note="constant, hardware.py"),
        Component("runtime", "NCCL buffers", hw.NCCL_BYTES if plan.world > 1 else 0, "fixed"),
        Component("runtime", "caching allocator reserve", reserve, "reserve",
                  note=f"{hw.ALLOCATOR_RESERVE:.0%} of the allocated peak"),
        Component("runtime", "host: worker process (CUDA libraries, staging)", hw.HOST_PROCESS_BYTES, "run",
                  where="host"),
    ]  # fmt: skip


def summary(plan: Plan) -> dict[str, Any]:
    return {
        "world": plan.world, "devices": plan.devices.describe(), "device_peak_bytes": plan.device_peak,
        "allocated_peak_bytes": plan.allocated_peak, "peak_phase": plan.peak_phase,
        "host_peak_bytes": plan.host_peak, "fits": plan.fits,
    }  # fmt: skip


__all__ = ["DTYPES", "Component", "Plan", "plan_config", "summary"]
