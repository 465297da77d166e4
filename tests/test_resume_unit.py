"""Checkpoint bookkeeping without processes: manifests, verification, discovery, compatibility, guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.checkpoints import (
    CheckpointMismatchError,
    TrainerState,
    check_compatible,
    find_checkpoints,
    latest_usable,
    problem,
    write_manifest,
)
from trainer.engine import FiniteStepGuard, weights_only_loads
from trainer.loop import LoopState, NonFiniteTrainingError

pytestmark = pytest.mark.unit


def _checkpoint(root: Path, step: int, fingerprint: dict | None = None) -> Path:
    directory = root / f"step_{step:08d}"
    (directory / "state").mkdir(parents=True)
    (directory / "state" / "shard.pt").write_bytes(bytes(range(256)) * 4)
    state = TrainerState(
        step, 2, 2, fingerprint or {"adapter.rank": 8}, ["manifest.json"], LoopState(step).to_dict()
    )
    state.write(directory)
    write_manifest(directory, "manifest.json")
    return directory


def test_a_whole_checkpoint_has_no_problem(tmp_path: Path) -> None:
    assert problem(_checkpoint(tmp_path, 3)) is None


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "state" / "shard.pt").write_bytes(b"short"), "has 5 bytes, the manifest says 1024"),
        (lambda d: (d / "state" / "shard.pt").write_bytes(b"x" * 1024), "does not match its sha256"),
        (lambda d: (d / "state" / "shard.pt").unlink(), "state/shard.pt is missing"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda d: (d / "trainer_state.json").write_text("{"), "trainer_state.json is missing or unreadable"),
    ],
    ids=["truncated", "corrupted", "file-missing", "manifest-missing", "state-unreadable"],
)
def test_damage_is_detected(tmp_path: Path, damage, expected: str) -> None:
    directory = _checkpoint(tmp_path, 3)
    damage(directory)
    assert expected in (problem(directory) or "")


def test_latest_usable_skips_broken_ones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (2, 4, 10):
        _checkpoint(tmp_path, step)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000010"]
    (tmp_path / "step_00000010" / "state" / "shard.pt").write_bytes(b"")
    assert latest_usable(tmp_path) == tmp_path / "step_00000004"
    assert "skipping checkpoint" in caplog.text and "step_00000010" in caplog.text


def test_incompatible_config_names_each_field(tmp_path: Path) -> None:
    saved = TrainerState.read(_checkpoint(tmp_path, 1, {"adapter.rank": 8, "adapter.method": "lora"}))
    check_compatible(saved, {"adapter.rank": 8, "adapter.method": "lora"}, tmp_path)
    with pytest.raises(CheckpointMismatchError) as err:
        check_compatible(saved, {"adapter.rank": 16, "adapter.method": "lora"}, tmp_path)
    assert "adapter.rank: the checkpoint has 8, this config has 16" in str(err.value)


def test_loop_state_stops_after_max_bad_steps_in_a_row() -> None:
    state = LoopState()
    state.record(1.0, skipped=False, max_bad=2)
    state.record(float("nan"), skipped=True, max_bad=2)
    state.record(0.9, skipped=False, max_bad=2)  # a good step resets the count
    state.record(float("nan"), skipped=True, max_bad=2)
    with pytest.raises(NonFiniteTrainingError, match="2 optimizer steps in a row"):
        state.record(float("inf"), skipped=True, max_bad=2)
    assert (state.skipped_steps, state.train_loss_first, state.train_loss_last) == (3, 1.0, 0.9)
    assert LoopState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_finite_step_guard_skips_non_finite_gradients() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    guard = FiniteStepGuard(torch.optim.AdamW([p], lr=0.1))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    guard.step()
    assert guard.skipped_last and torch.equal(p.detach(), torch.ones(3)) and guard.state == {}
    p.grad = torch.ones(3)
    guard.step()
    assert not guard.skipped_last and (p.detach() < 1).all()


def test_finite_step_guard_measures_then_clips_the_norm() -> None:
    """At ZeRO-0 fp32 the guard is what measures grad_norm (DeepSpeed measures none there) and clips: the
    norm reported is the one before clipping, the step is taken with the clipped gradient."""
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    guard = FiniteStepGuard(torch.optim.SGD([p, q], lr=1.0), max_norm=1.0)
    p.grad, q.grad = torch.tensor([3.0]), torch.tensor([4.0])
    guard.step()
    assert guard._global_grad_norm == pytest.approx(5.0)
    torch.testing.assert_close(torch.cat([p.detach(), q.detach()]), -torch.tensor([0.6, 0.8]))
    p.grad, q.grad = torch.tensor([0.3]), torch.tensor([0.4])  # under the threshold: untouched
    guard.step()
    assert guard._global_grad_norm == pytest.approx(0.5)
    torch.testing.assert_close(torch.cat([p.detach(), q.detach()]), -torch.tensor([0.9, 1.2]))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a tampered checkpoint would carry
        return (Path.touch, (self.marker,))


def test_weights_only_loads_refuse_code_in_a_checkpoint(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "model_states.pt"
    torch.save({"module": {}, "payload": _Exploit(marker)}, path)
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}}, path)
    with weights_only_loads():
        assert torch.equal(torch.load(path)["module"]["w"], torch.ones(2))
    assert torch.load is not None and "weights_only_loads" not in repr(torch.load)
