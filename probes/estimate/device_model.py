"""From a traced step to what a card runs out of: the allocator replay plus what CUDA adds.

The trace sees every storage the step allocates and frees, in order. A real card differs in
three ways, each modelled here, and the constants were fitted on real H100 runs of GPT-2
(`../shared/calibration/h100-gpt2.json`, `probes.estimate.calibration`, docs/estimate.md):

- **the caching allocator** holds whole segments, not live bytes: the trace's allocations and
  frees are replayed through `probes.estimate.allocator` (with the plan's `alloc_conf`), which
  gives reserved bytes and the verdict on a card (with the allocator's own retry after freeing
  cached segments). This is a mechanism, not a constant: replayed with the history each real
  trial had, it reproduced their fragmentation (reserved over allocated) to within 0.3 % at the
  boundary. Since the boundary depends on that history, a verdict holds in a fresh process *and*
  after a batch-size-1 step ran first (the worse of the two);
- **library workspaces** (cuBLAS/cuBLASLt for the forward's and the backward's threads) are
  allocated through the allocator once and live for the process (`persistent_untracked_bytes`);
- **activations CUDA keeps that the trace does not**: 2–4 % of the traced activation bytes,
  growing with the micro-batch (GPT-2: 36 MiB per sample in bf16, 72 in fp32, none left with
  checkpointing); not yet pinned to one tensor, so covered as a fraction of the traced activations
  at the peak (`activation_slack`, and `activation_slack_checkpointing` with checkpointing), the
  largest fraction the calibration set showed;
- **the CUDA context and lazily loaded kernels** take card memory outside the allocator
  (`context_overhead_bytes`: what the H100 showed free before the model, less what the largest
  passing trial left of it).
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.estimate.allocator import AllocationLog, AllocatorStats, replay
from tuner.alloc_conf import AllocatorSettings
from tuner.search_types import SEGMENT_BYTES

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceModel:
    """What turns a trace into a card's allocated and reserved bytes, and a fit verdict."""

    context_overhead_bytes: int = 1_126_087_888
    """Card memory the allocator can never reserve: the CUDA context and library handles (H100:
    527 MiB before the model was built) plus what loads later (kernels, cuDNN), fitted on the H100
    runs as the total less the smallest capacity at which every real pass passes (1,074 MiB)."""
    persistent_untracked_bytes: int = 74_986_496
    """Allocator memory that library workspaces hold from the first step on (H100, torch 2.11:
    allocated after the first step less what the replay allocates for parameters and optimizer
    state, the largest of the calibration sets: 71.5 MiB)."""
    activation_slack: float = 0.0252
    """Activation bytes CUDA holds beyond the trace without gradient checkpointing, as a fraction
    of the traced activations at the peak, for a step that computes in 16-bit floats; twice that
    for fp32 compute, since the gap grew with the compute dtype's width (H100, GPT-2: 36 MiB per
    sample in bf16, 72 in fp32)."""
    activation_slack_checkpointing: float = 0.0
    """The same with gradient checkpointing, where the calibration runs showed almost none."""
    replay_iterations: int = 3
    """Train steps replayed: the traced two, then the second again, so that a plan holds in a
    loop's steady state and not only in its first steps."""

    def usable_bytes(self, total_memory_bytes: int) -> int:
        """What the allocator can reserve on a card of `total_memory_bytes`."""
        return max(0, total_memory_bytes - self.context_overhead_bytes)

    def slack_bytes(
        self, activation_bytes: int, *, gradient_checkpointing: bool, compute_dtype_bytes: int = 2
    ) -> int:
        """Untraced activation bytes at the peak, in whole 2 MiB segments."""
        fraction = self.activation_slack_checkpointing if gradient_checkpointing else self.activation_slack
        return _segments(int(activation_bytes * fraction * compute_dtype_bytes / 2))

    def replay(
        self,
        log: AllocationLog,
        settings: AllocatorSettings,
        *,
        capacity_bytes: int | None = None,
        activation_bytes: int = 0,
        gradient_checkpointing: bool = False,
        compute_dtype_bytes: int = 2,
        warmup: AllocationLog | None = None,
    ) -> AllocatorStats:
        """The allocator's peaks for a traced step, with the workspaces and the activation slack;
        with a capacity, whether the step fits it (the slack is kept out of the capacity, since
        it is live around the peak).

        Where the boundary lies depends on the allocator's history, so with a `warmup` trace the
        step is replayed twice, in a fresh process and after that smaller step ran first (where
        the optimizer's state then lives changes later fragmentation: `allocator.replay`), and
        the worse of the two is the answer."""
        slack = self.slack_bytes(
            activation_bytes,
            gradient_checkpointing=gradient_checkpointing,
            compute_dtype_bytes=compute_dtype_bytes,
        )
        bounded = None if capacity_bytes is None else max(0, capacity_bytes - slack)
        histories = [None] if warmup is None else [None, warmup]
        runs = [
            replay(
                log,
                settings,
                capacity_bytes=bounded,
                preallocated_bytes=self.persistent_untracked_bytes,
                iterations=self.replay_iterations,
                warmup=history,
            )
            for history in histories
        ]
        return AllocatorStats(
            peak_allocated_bytes=max(run.peak_allocated_bytes for run in runs) + slack,
            peak_reserved_bytes=max(run.peak_reserved_bytes for run in runs) + slack,
            num_alloc_retries=max(run.num_alloc_retries for run in runs),
            out_of_memory=any(run.out_of_memory for run in runs),
        )


def _segments(nbytes: int) -> int:
    return -(-nbytes // SEGMENT_BYTES) * SEGMENT_BYTES


def compute_dtype_bytes(precision: str) -> int:
    """Bytes per element of the dtype a precision computes its activations in."""
    return 4 if precision == "fp32" else 2


DEFAULT_DEVICE_MODEL = DeviceModel()
