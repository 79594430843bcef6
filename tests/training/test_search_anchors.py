"""Our `doubling` and `backoff` strategies against the anchors' own code, on the same devices.

The comparison tables (docs/probe.md) set guided search against "Lightning's finder" and
"Accelerate's back-off"; these tests run Lightning's `Tuner.scale_batch_size(mode="binsearch")`
in a real CPU `Trainer`, and Accelerate's `find_executable_batch_size`, against every synthetic
device of the search tests, and check that they try the same batch sizes in the same order as our
reimplementations do. A training step "runs out of memory" the way a GPU does: it raises
`torch.cuda.OutOfMemoryError` (the anchors recognise it by its message, we by its type).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.unit.synthetic_devices import SyntheticDevice, table
from tuner.search import find_max_batch

pytest.importorskip("accelerate")
pl = pytest.importorskip("lightning.pytorch")

from accelerate.utils import find_executable_batch_size  # noqa: E402

# Lightning's finder stops before trying `max_val` itself, where ours tries the limit: the
# "everything fits" device is where the two differ by design and is left out of the comparison.
COMPARABLE = [device for device in table() if device.true_max < device.max_batch_size]


def raise_out_of_memory(batch_size: int) -> None:
    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {batch_size}.")


class DeviceBoundModule(pl.LightningModule):
    """A LightningModule whose every training step is a trial on a synthetic device."""

    def __init__(self, device: SyntheticDevice, dataset_size: int) -> None:
        super().__init__()
        self.synthetic = device
        self.batch_size = 1
        self.tried: list[int] = []
        self.layer = torch.nn.Linear(2, 1)
        self.data = TensorDataset(torch.zeros(dataset_size, 2))

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(self.data, batch_size=self.batch_size)

    def training_step(self, batch: list[torch.Tensor], _index: int) -> torch.Tensor:
        size = batch[0].shape[0]
        self.tried.append(size)
        if not self.synthetic.fits(size).ok:
            raise_out_of_memory(size)
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def lightning_binsearch(device: SyntheticDevice, root: Path) -> tuple[list[int], int | None]:
    """The sizes Lightning's binsearch finder tries, and its answer before its safety margin."""
    module = DeviceBoundModule(device, dataset_size=4 * max(device.true_max, 1) + 8)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    answer = pl.tuner.Tuner(trainer).scale_batch_size(
        module,
        mode="binsearch",
        init_val=1,
        steps_per_trial=1,
        max_trials=64,
        margin=0.0,
        max_val=device.max_batch_size,
    )
    return module.tried, answer


@pytest.mark.parametrize("device", COMPARABLE, ids=lambda d: d.name)
def test_doubling_tries_what_lightnings_finder_tries(device: SyntheticDevice, tmp_path: Path) -> None:
    theirs, their_answer = lightning_binsearch(device.fresh(), tmp_path)
    ours = find_max_batch(device.fresh().fits, strategy="doubling", max_trials=64)

    assert [trial.batch_size for trial in ours.trials] == theirs
    if device.true_max == 0:
        # Lightning cannot say that nothing fits: it answers its starting size.
        assert (ours.max_batch_size, their_answer) == (0, 1)
    else:
        assert ours.max_batch_size == their_answer


@pytest.mark.parametrize("device", table(), ids=lambda d: d.name)
def test_backoff_tries_what_accelerate_tries(device: SyntheticDevice) -> None:
    start = min(device.max_batch_size, 4 * max(device.true_max, 1))
    theirs_device = device.fresh()
    tried: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def train(batch_size: int) -> int:
        tried.append(batch_size)
        if not theirs_device.fits(batch_size).ok:
            raise_out_of_memory(batch_size)
        return batch_size

    try:
        their_answer = train()
    except RuntimeError as exc:  # Accelerate's way of saying that nothing fits
        assert "No executable batch size found" in str(exc)
        their_answer = 0
    ours = find_max_batch(device.fresh().fits, strategy="backoff", max_batch_size=start, max_trials=64)

    assert [trial.batch_size for trial in ours.trials] == tried
    assert ours.max_batch_size == their_answer
