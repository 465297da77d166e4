"""Speed levers applied to the finished adapter model: Liger kernels, then regional torch.compile.

Both come last in the transform order (trainer.model.load._finish): after the adapters are injected and
gradient checkpointing wraps the layers, so the kernels and the compiled code see the final forward.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from trainer.config import ConfigError

log = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: every transformers decoder layer derives from GradientCheckpointingLayer."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer in place, as torchtune does (regional compilation): every layer
    has the same code, so one compiled graph serves them all (compiled once, not once per layer as a
    whole-model compile would unroll it), and the embedding, head and loss stay eager. ``Module.compile``
    keeps the module tree and the parameter names (checkpoints, DeepSpeed and the adapters see the same
    model). Batch shapes vary with the padded length: dynamo recompiles once with a dynamic length.

    On a 4-bit base nothing breaks the graph with bitsandbytes 0.50: it registers its 4-bit matmul as
    torch custom ops, which dynamo traces as opaque calls (measured with ``torch._dynamo.explain`` on one
    NF4 Llama layer on the CPU: one graph, no break), so the dequantise-and-matmul stays bitsandbytes'
    own kernel and the norms, rotary embedding, attention, activation and adapter arithmetic around it
    are compiled.
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)


def apply_liger(model: PreTrainedModel, device: torch.device) -> None:
    """Liger kernels (RMSNorm, SwiGLU, RoPE) patched into this model instance. They are Triton kernels for
    CUDA: anywhere else, or without liger-kernel installed, one error naming the field. Its fused linear
    cross-entropy is not used: the project computes the loss from the logits itself (trainer.loss)."""
    if device.type != "cuda":
        raise ConfigError(
            f"train.liger: Liger kernels are Triton kernels for CUDA GPUs and this worker trains on "
            f"{device}; set train.liger: false"
        )
    if find_spec("liger_kernel") is None:
        raise ConfigError("train.liger: liger-kernel is not installed (pip install liger-kernel); set "
                          "train.liger: false")  # fmt: skip
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ConfigError(f"train.liger: liger-kernel has no kernels for model type {model_type!r}; set "
                          "train.liger: false")  # fmt: skip
    apply(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
          fused_linear_cross_entropy=False)  # fmt: skip
    log.info("Liger kernels (RoPE, RMSNorm, SwiGLU) applied to the %s model", model_type)
