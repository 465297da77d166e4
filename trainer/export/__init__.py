"""What a run leaves for use after training: the adapter on disk, and the adapter merged into its base.

- ``adapter``: export in PEFT's on-disk format where PEFT knows the method (our own documented layout
  otherwise, docs/adapter-format.md), and loading it back (safetensors only);
- ``merge``: fold an adapter into its base, a plain transformers model directory.
"""

from trainer.export.adapter import (
    OUR_CONFIG,
    PEFT_PREFIX,
    SavedAdapter,
    adapter_state_dict,
    load_adapter_state,
    load_saved_adapter,
    peft_target_modules,
    read_adapter,
    save_adapter,
)
from trainer.export.merge import (
    MergeError,
    build_adapted_model,
    find_adapter_dir,
    merge_adapter,
    merge_into_base,
)

__all__ = [
    "OUR_CONFIG",
    "PEFT_PREFIX",
    "MergeError",
    "SavedAdapter",
    "adapter_state_dict",
    "build_adapted_model",
    "find_adapter_dir",
    "load_adapter_state",
    "load_saved_adapter",
    "merge_adapter",
    "merge_into_base",
    "peft_target_modules",
    "read_adapter",
    "save_adapter",
]
