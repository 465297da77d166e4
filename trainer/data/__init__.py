"""Training data: local rows -> rendered and tokenised examples -> deterministic global batches.

sources.py   files, globs and save_to_disk directories (never the hub), read whole or streamed
formats.py   text / instruction / chat rendering and which tokens carry loss
tokenized.py the tokenisation cache and the bad-row policy (map-style)
order.py     mixture, windowed shuffle and packing order of an epoch (shared by both paths)
packing.py   best-fit-decreasing packing and the collators (position ids restart per example)
batches.py   global batches, cut the same way for any worker count; map-style batches
streaming.py the same batches from a stream, resumable from a saved position
build.py     build_data, the entry point the worker calls

Global batch k is a fixed slice of an epoch's rows, an order that depends only on the seed and the
epoch. It is cut into ``world_size * grad_accum_steps`` micro-batches; rank r takes micro-batch
``j * world_size + r`` at accumulation step j. So 2 workers x 1 accumulation step see exactly the
micro-batches of 1 worker x 2 steps, and runs compare across worker counts. The loss is a sum over
tokens divided by the loss tokens of the whole global batch, which every rank can count locally: no
communication, and the same gradient however the batch is cut (packed or not).
"""

from trainer.data.batches import GlobalBatches, Layout, MapBatches, StepBatch, eval_batches
from trainer.data.build import build_data
from trainer.data.formats import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, make_encoder
from trainer.data.packing import collate_packed, collate_padded, pack
from trainer.data.sources import DataError
from trainer.data.streaming import StreamBatches

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "DataError",
    "GlobalBatches",
    "Layout",
    "MapBatches",
    "StepBatch",
    "StreamBatches",
    "build_data",
    "collate_packed",
    "collate_padded",
    "eval_batches",
    "make_encoder",
    "pack",
]
