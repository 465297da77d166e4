"""The memory planner: what a run needs per GPU and per host, from ``config.json`` alone, before any
GPU is rented (``python -m launch plan``). See trainer/plan/planner.py for how a peak is put together."""

from trainer.plan.advice import advise, plan_or_error
from trainer.plan.hardware import Devices, HardwareError, cuda_devices, parse_gpus, parse_size
from trainer.plan.planner import Component, Plan, plan_config

__all__ = [
    "Component", "Devices", "HardwareError", "Plan", "advise", "cuda_devices", "parse_gpus", "parse_size",
    "plan_config", "plan_or_error",
]  # fmt: skip
