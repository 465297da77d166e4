"""The plan as a table (per GPU, per host, verdict, suggestion) and as JSON."""

from __future__ import annotations

from typing import Any

from trainer.plan import hardware as hw
from trainer.plan.advice import Advice, what_it_takes
from trainer.plan.planner import Plan

PHASES = {"run": "held", "load": "loading", "train": "fwd/bwd", "step": "opt. step", "fixed": "fixed",
          "reserve": "reserve"}  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / hw.GIB:8.2f}"


def table(plan: Plan) -> str:
    """Per-rank components (GiB), the peak and how it is made up, and the host's total."""
    lines = [f"plan: {plan.world} rank(s) on {plan.devices.describe()}, micro-batch {plan.micro_batch} x "
             f"{plan.seq_len} tokens", "",
             f"{'section':<12} {'component':<54} {'GiB':>8}  {'when':<9} note",
             "-" * 110]  # fmt: skip
    for c in plan.components:
        if c.where != "device":
            continue
        lines.append(f"{c.section:<12} {c.name:<54} {_gib(c.bytes)}  {PHASES[c.phase]:<9} {c.note}")
    lines.append("-" * 110)
    peak_name = (
        f"peak per {'GPU' if plan.devices.kind == 'cuda' else 'process'} (held + {plan.peak_phase} + fixed)"
    )
    lines.append(
        f"{'':<12} {peak_name:<54} {_gib(plan.device_peak)}  of {plan.devices.memory / hw.GIB:.1f} GiB"
    )
    if plan.devices.kind == "cuda":
        lines.append(f"{'':<12} {'of which allocated by torch (max_memory_allocated)':<54} "
                     f"{_gib(plan.allocated_peak)}")  # fmt: skip
        lines.append("")
        for c in plan.components:
            if c.where == "host":
                lines.append(f"{'host':<12} {c.name:<54} {_gib(c.bytes)}  per rank  {c.note}")
    ram = f" of {plan.cpu_ram / hw.GIB:.1f} GiB" if plan.cpu_ram else ""
    lines.append(f"{'host':<12} {f'host RAM, {plan.ranks_per_host} rank(s) per host':<54} "
                 f"{_gib(plan.host_peak)}{ram}  (+ the checkpoint's page cache, reclaimable)")  # fmt: skip
    return "\n".join(lines)


def render(advice: Advice) -> str:
    out = [table(advice.plan), ""]
    if advice.plan.fits:
        out.append(f"verdict: FITS ({advice.plan.device_peak / hw.GIB:.1f} GiB of "
                   f"{advice.plan.devices.memory / hw.GIB:.1f} GiB per device)")  # fmt: skip
    else:
        out.append(f"verdict: DOES NOT FIT (short by {advice.plan.shortfall / hw.GIB:.1f} GiB"
                   f"{'' if advice.plan.fits_host else ', host RAM too'})")  # fmt: skip
        out.append(f"suggestion: {advice.message}")
        if advice.what_if is not None:
            out.append(f"what it takes on these GPUs: {what_it_takes(advice)}")
    return "\n".join(out)


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "world": plan.world,
        "devices": {"count": plan.devices.count, "memory_bytes": plan.devices.memory,
                    "kind": plan.devices.kind},
        "micro_batch": plan.micro_batch, "seq_len": plan.seq_len,
        "components": [c.__dict__ for c in plan.components],
        "peak_phase": plan.peak_phase, "allocated_peak_bytes": plan.allocated_peak,
        "device_peak_bytes": plan.device_peak, "host_peak_bytes": plan.host_peak,
        "ranks_per_host": plan.ranks_per_host, "cpu_ram_bytes": plan.cpu_ram,
        "fits": plan.fits, "fits_device": plan.fits_device, "fits_host": plan.fits_host,
        "shortfall_bytes": plan.shortfall,
    }  # fmt: skip


def advice_json(advice: Advice) -> dict[str, Any]:
    return {
        "plan": plan_json(advice.plan), "fits": advice.plan.fits, "suggestion": advice.message or None,
        "changes": advice.changes, "gpus": advice.gpus,
        "fixed_plan": plan_json(advice.fixed) if advice.fixed is not None else None,
        "what_if_param_offload": plan_json(advice.what_if) if advice.what_if is not None else None,
    }  # fmt: skip
