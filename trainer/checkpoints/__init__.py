"""Training-state checkpoints, and the atomic writes every artefact of a run goes through.

- ``state``: what a checkpoint holds, how it is sealed (manifests), verified, found and resumed from;
- ``sink``: where checkpoints are written (``<output.dir>/checkpoints/step_<N>``, the last K kept);
- ``atomic``: files and directories written to a temporary name and renamed, so a crash mid-write
  leaves the previous artefact intact (checkpoints, the adapter export and the merge all use it).
"""

from trainer.checkpoints.atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    file_lock,
    resolve_dir,
)
from trainer.checkpoints.sink import CheckpointSink, DirectorySink
from trainer.checkpoints.state import (
    STATE_FILE,
    CheckpointMismatchError,
    TrainerState,
    check_compatible,
    find_checkpoints,
    fingerprint,
    latest_usable,
    problem,
    record_attempt,
    resolve,
    restore_rng,
    save_rng,
    write_manifest,
)

__all__ = [
    "STATE_FILE",
    "CheckpointMismatchError",
    "CheckpointSink",
    "DirectorySink",
    "TrainerState",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_compatible",
    "file_lock",
    "find_checkpoints",
    "fingerprint",
    "latest_usable",
    "problem",
    "record_attempt",
    "resolve",
    "resolve_dir",
    "restore_rng",
    "save_rng",
    "write_manifest",
]
