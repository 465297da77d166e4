"""The cheapest changes that make a plan fit, tried in order of what they cost the run.

Each candidate is a set of config overrides (or more GPUs), re-planned with the same model counts:

1. gradient checkpointing on (costs ~30% more compute, changes no result);
2. the loss chunked (trainer/loss.py; same numbers);
3. a smaller micro-batch with more accumulation steps (same global batch, slower);
4. ZeRO-3 (shards the base and the adapters' states; more communication);
5. optimizer offload (the adapters' optimizer states in host RAM; slower steps);
6. more GPUs of the same kind (doubling), which changes the bill.

The first single change that fits is the suggestion; if none does, the changes are combined in that
order, then GPUs are added. A plan that no combination fits says by how much it misses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer import config as config_lib
from trainer.config import ConfigError, RunConfig
from trainer.loss import chunk_tokens_for
from trainer.plan import hardware as hw
from trainer.plan.counts import ModelCounts, count_model
from trainer.plan.planner import Plan, plan_config

MAX_GPUS = 64


@dataclass
class Advice:
    """The plan as configured, and what to change if it does not fit."""

    plan: Plan
    changes: list[str] = field(default_factory=list)
    gpus: int | None = None
    fixed: Plan | None = None
    message: str = ""
    what_if: Plan | None = None  # with ZeRO-3 parameter offload, which the configs cannot ask for yet


def _override(cfg: RunConfig, changes: dict[str, Any]) -> RunConfig:
    raw = cfg.model_dump(mode="json")
    return config_lib.validate(config_lib.apply_overrides(raw, [f"{k}={v}" for k, v in changes.items()]))


def _candidates(cfg: RunConfig, counts: ModelCounts) -> list[dict[str, Any]]:
    """Single changes, cheapest first, that apply to ``cfg``."""
    out: list[dict[str, Any]] = []
    if not cfg.model.gradient_checkpointing:
        out.append({"model.gradient_checkpointing": "true"})
    try:
        if chunk_tokens_for(cfg.train.loss_chunk_tokens, counts.config) == 0:
            chunk_tokens_for(1024, counts.config)  # raises where the architecture forbids chunking
            out.append({"train.loss_chunk_tokens": 1024})
    except ValueError:
        pass
    b, g = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    while b > 1:
        b, g = max(1, b // 2), g * 2
        out.append({"train.micro_batch_size": b, "train.grad_accum_steps": g})
    if cfg.distributed.zero_stage < 3:
        out.append({"distributed.zero_stage": 3})
    if not cfg.distributed.offload_optimizer:
        out.append({"distributed.offload_optimizer": "true"})
    return out


def advise(
    cfg: RunConfig, devices: hw.Devices, seq_len: int | None = None, architecture: str | None = None,
    cpu_ram: int | None = None, gpus_per_host: int | None = None, plan_fn: Callable[..., Plan] = plan_config,
) -> Advice:  # fmt: skip
    """Plan ``cfg`` on ``devices``; if it does not fit, find the cheapest change that does."""
    counts = count_model(cfg, architecture)

    def plan(c: RunConfig, d: hw.Devices, offload_params: bool = False) -> Plan:
        return plan_fn(c, d, seq_len=seq_len, architecture=architecture, cpu_ram=cpu_ram, counts=counts,
                       ranks_per_host=min(d.count, gpus_per_host or devices.count),
                       offload_params=offload_params)  # fmt: skip

    first = plan(cfg, devices)
    advice = Advice(first)
    if first.fits:
        return advice
    candidates = _candidates(cfg, counts)
    for change in candidates:
        trial = plan(_override(cfg, change), devices)
        if trial.fits:
            return _found(advice, change, None, trial)
    combined: dict[str, Any] = {}
    current = cfg
    for change in candidates:
        combined.update(change)
        current = _override(cfg, combined)
        trial = plan(current, devices)
        if trial.fits:
            return _found(advice, combined, None, trial)
    advice.what_if = plan(current, devices, offload_params=True)
    count = devices.count * 2
    while count <= MAX_GPUS:
        more = hw.Devices(count, devices.memory, devices.kind)
        for changes, c in (({}, cfg), (combined, current)):
            trial = plan(c, more)
            if trial.fits:
                return _found(advice, changes, count, trial)
        count *= 2
    best = plan(current, devices)
    advice.fixed = best
    advice.message = (
        f"cannot fit on {devices.describe()} with any ZeRO stage, offload, checkpointing or micro-batch: "
        f"at the most frugal setting ({_describe(combined)}) a rank needs "
        f"{best.device_peak / hw.GIB:.1f} GiB, {best.shortfall / hw.GIB:.1f} GiB more than it has"
        + ("" if best.fits_host else f" (host RAM: {best.host_peak / hw.GIB:.1f} GiB needed)")
        + f"; nor with up to {MAX_GPUS} such GPUs"
    )
    return advice


def what_it_takes(advice: Advice) -> str:
    """The what-if: the most frugal setting with the base offloaded to host RAM (ZeRO-3 offload_param)."""
    w = advice.what_if
    if w is None:
        return ""
    verdict = "would fit" if w.fits else "would still not fit"
    return (
        f"with ZeRO-3 parameter offload (the base's partitions in pinned host RAM, as DeepSpeed's "
        f"offload_param does; not yet a distributed.* option here) it {verdict}: "
        f"{w.device_peak / hw.GIB:.1f} GiB per GPU, {w.host_peak / hw.GIB:.1f} GiB host RAM per host"
    )


def _describe(changes: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in changes.items()) or "as configured"


def _found(advice: Advice, changes: dict[str, Any], gpus: int | None, plan: Plan) -> Advice:
    advice.changes = [f"{k}={v}" for k, v in changes.items()]
    advice.gpus = gpus
    advice.fixed = plan
    more = f" on {gpus} GPUs" if gpus else ""
    advice.message = (
        f"fits with: {_describe(changes)}{more} ({plan.device_peak / hw.GIB:.1f} GiB per GPU, "
        f"host {plan.host_peak / hw.GIB:.1f} GiB)"
    )
    return advice


def plan_or_error(cfg: RunConfig, devices: hw.Devices, **kwargs: Any) -> Advice:
    """``advise``, its failures turned into ConfigErrors that name the option (for the CLI's exit 2)."""
    try:
        return advise(cfg, devices, **kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # transformers: an attention implementation the architecture lacks, ...
        raise ConfigError(f"{cfg.model.path}: {e}") from None
