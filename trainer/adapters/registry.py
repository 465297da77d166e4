"""Adapter methods by config name: adding a method is one module and one line here."""

from trainer.adapters.layer import Adapter
from trainer.adapters.lora import LoRA

REGISTRY: dict[str, type[Adapter]] = {
    "lora": LoRA,
}
