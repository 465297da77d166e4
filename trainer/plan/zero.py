"""What DeepSpeed ZeRO keeps per rank for the trainable (adapter) parameters, and its buffers.

Read from deepspeed 0.19.8 (runtime/zero/stage_1_and_2.py, stage3.py, runtime/bf16_optimizer.py) for
the configuration trainer.engine ``deepspeed_config`` builds (torch AdamW as a client optimizer, bf16
or fp32, ``reduce_bucket_size`` = ``allgather_bucket_size`` = ``zero_bucket_elements(trainable)``):

- the trainable parameters in the training dtype: whole on every rank at stages 0-2 (flattened into
  one buffer, ``bit16_groups_flat``), a 1/N partition at stage 3 (``fp16_partitioned_groups_flat``);
- their float32 master copy (``single_partition_of_fp32_groups`` / ``fp32_partitioned_groups_flat``):
  1/N at stages 1-3; at stage 0 in bf16 DeepSpeed's BF16_Optimizer keeps it whole; fp32 at stage 0
  trains the parameters themselves (no copy);
- AdamW's two float32 moments of the master copy (SGD with momentum: one; without: none), same split;
- gradients in the training dtype: whole at stages 0-1, a 1/N partition at stages 2-3
  (``grads_in_partition`` / ``grad_partitions_flat_buffer``), and a float32 copy of the partition the
  optimizer steps on (``single_partition_grad``) at stages 1-3;
- the reduce bucket (``ipg_buffer`` / ``__ipg_bucket_flat_buffer``), ``(1 + overlap_comm)`` buffers of
  the bucket's elements in the training dtype; overlap_comm is DeepSpeed's default, on at stage 3 only;
- the all-gather bucket of stages 1-2 (updated partitions gathered after the step), transient;
- with ``offload_optimizer`` the master copy, the moments and the float32 gradient live in host RAM
  (pinned on GPUs) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

FLOAT32 = 4


def shard(elements: int, world: int) -> int:
    """Elements of one rank's partition: DeepSpeed pads each partition to ceil(n / N)."""
    return -(-elements // world)


@dataclass(frozen=True)
class AdapterStates:
    """Per-rank bytes of the adapters' ZeRO states: on the device and (offloaded) on the host."""

    params: int
    grads: int
    master: int
    moments: int
    fp32_grads: int
    reduce_buckets: int
    allgather_bucket: int
    host: int

    @property
    def persistent(self) -> int:
        """What stays on the device for the whole run."""
        return self.params + self.grads + self.master + self.moments


def adapter_states(
    trainable: int, itemsize: int, stage: int, world: int, offload: bool, optimizer: str, momentum: float,
    bucket_elements: int,
) -> AdapterStates:  # fmt: skip
    """ZeRO states of ``trainable`` parameters on one of ``world`` ranks (see the module doc)."""
    part = shard(trainable, world)
    params = trainable * itemsize if stage < 3 else part * itemsize
    grads = trainable * itemsize if stage < 2 else part * itemsize
    moment_count = 2 if optimizer == "adamw" else (1 if momentum else 0)
    if stage == 0:
        master = trainable * FLOAT32 if itemsize != FLOAT32 else 0
        moments = moment_count * trainable * FLOAT32
        fp32_grads = trainable * FLOAT32 if itemsize != FLOAT32 else 0
    else:
        master = part * FLOAT32
        moments = moment_count * part * FLOAT32
        fp32_grads = part * FLOAT32
    host = 0
    if offload and stage > 0:
        host = master + moments + fp32_grads
        master = moments = fp32_grads = 0
    overlap = 1 if stage == 3 else 0
    reduce = (1 + overlap) * bucket_elements * itemsize if stage > 0 else 0
    allgather = bucket_elements * itemsize if stage in (1, 2) else 0
    return AdapterStates(params, grads, master, moments, fp32_grads, reduce, allgather, host)
