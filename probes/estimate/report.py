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
    """Predicted `torch.cuda.max_memory_allocated`: the caching allocator's blocks for the traced
    allocations, plus what CUDA allocates that a trace does not see (library workspaces,
    `DeviceModel.persistent_untracked_bytes`, and the activation slack)."""
    peak_reserved_bytes: int
    """Predicted `torch.cuda.max_memory_reserved`: the allocator's segments when the trace is
    replayed through it (what actually runs out), plus the same additions."""
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
    activation_slack_bytes: int = 0
    """Of the peaks, the activations CUDA keeps beyond the trace (`DeviceModel.activation_slack`)."""
    alloc_conf: str | None = None
    """The `PYTORCH_CUDA_ALLOC_CONF` the allocator replay assumed (None: PyTorch's default)."""
    assumptions: tuple[str, ...] = ()
    """What the trace assumed for tensor values it cannot read (MoE routing, conditions), in words
    with the model's file and line (`probes.estimate.value_reads`)."""
