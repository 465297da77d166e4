"""The errors a user's input raises, in a module that imports nothing.

``launch.errors`` sorts every exception into "the user's mistake" or not, in the CLI and in Ray's
controller (which unpickles a failed worker's exception). Importing them from here costs nothing;
importing them from where they are raised would pull in torch, DeepSpeed, transformers and datasets
(7 s of a Ray run's start-up, twice: in the driver and in the controller).
"""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used; the message names the file (and the row, where there is one)."""


class MergeError(ValueError):
    """The adapter cannot be merged (an input-dependent method, or a base that does not match)."""


class InferenceError(ValueError):
    """The run, adapter or prompt cannot be used as asked; the message says what to change."""
