"""Adapter methods by config name: adding a method is one module and one line here."""

from trainer.adapters.bat import Bat
from trainer.adapters.bone import Bone
from trainer.adapters.dora import DoRA
from trainer.adapters.flora import FLoRA
from trainer.adapters.layer import Adapter
from trainer.adapters.lora import LoRA
from trainer.adapters.mosara import MoSARA
from trainer.adapters.sara import SARA

REGISTRY: dict[str, type[Adapter]] = {
    "lora": LoRA,
    "dora": DoRA,
    "bone": Bone,
    "bat": Bat,
    "flora": FLoRA,
    "sara": SARA,
    "mosara": MoSARA,
}
