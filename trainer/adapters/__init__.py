"""The LoRA family of adapters: one module per method, registered in ``registry.py``."""

from trainer.adapters.inject import (
    adapter_layers,
    adapter_parameters,
    find_targets,
    freeze_base,
    inject_adapters,
    rank_map,
    rank_table,
)
from trainer.adapters.layer import Adapter, AdapterLayer
from trainer.adapters.registry import REGISTRY

__all__ = [
    "REGISTRY",
    "Adapter",
    "AdapterLayer",
    "adapter_layers",
    "adapter_parameters",
    "find_targets",
    "freeze_base",
    "inject_adapters",
    "rank_map",
    "rank_table",
]
