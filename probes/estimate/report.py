"""What one estimate returns. Plain data (no torch), so that the CLI, the API and a parent
process read it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EstimateReport:
    """The predicted peak memory of the canonical train step at one micro-batch size."""

    batch_size: int
    """Micro-batch size traced."""
    peak_allocated_bytes: int
    """Predicted `torch.cuda.max_memory_allocated`: the traced peak plus the allocations CUDA
    makes that a trace does not see (library workspaces; `DeviceModel.untracked_allocated_bytes`)."""
    peak_reserved_bytes: int
    """Predicted peak of the caching allocator's reserved memory (what actually runs out)."""
    peak_phase: str
    """forward, backward or optimizer: where the peak happened."""
    categories: dict[str, int]
    """Traced live bytes at the peak: parameters (with buffers), gradients, optimizer_state,
    activations (everything else: saved activations, temporaries, the batch)."""
    seconds: float
    """Wall time of the estimate: building the fake model and tracing the steps."""
    gradient_checkpointing: bool
    """Whether activation checkpointing was on."""
    traced_peak_bytes: int = 0
    """The peak of live storage bytes in the trace itself (512-byte rounded)."""
    peak_iteration: int = 0
    """Iteration (0-based) of the peak; the second is the steady one."""
    peak_by_phase: dict[str, int] = field(default_factory=dict)
    """Highest traced live bytes seen in each phase."""
    ops: tuple[str, ...] = ()
    """Names of the ATen ops the trace ran (only when asked for)."""
