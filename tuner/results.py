"""What probes and the planner produce: probe results and plans (docs/contract.md shapes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from tuner.parallelism import NONE, ParallelismSpec
from tuner.search_types import MemoryLine, Trial
from tuner.spec import (
    Backend,
    DeviceSpec,
    PlanPolicy,
    StepKind,
    WorkloadSpec,
    refuse_nul_characters,
    validated_alloc_conf,
)

ProbeBackend = Literal["cuda", "estimate", "cpu"]
"""Where a probe's trials ran: `cuda` (a real GPU), `estimate` (a fake-tensor trace), or `cpu`: an
`autotune` run without CUDA, which measured no GPU memory. A `cpu` result is never stored or
planned from; the label keeps a CPU run from passing for the GPU it was meant for."""


class WorkloadFacts(BaseModel):
    """Facts about the built model that the planner needs."""

    model_config = ConfigDict(frozen=True)

    parameter_count: int
    trainable_parameter_count: int | None = None
    has_batchnorm: bool = False
    has_moe: bool = False


class ProbeResult(BaseModel):
    """The largest micro-batch of one workload on one device, for one checkpointing choice,
    with every trial that led there."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_nul(cls, data: Any) -> Any:
        return refuse_nul_characters(data)

    id: int | None = None
    created_at: datetime | None = None
    fingerprint: str
    workload: WorkloadSpec
    device: DeviceSpec
    backend: ProbeBackend
    gradient_checkpointing: bool
    max_batch_size: int
    """Largest micro-batch that fit (0: nothing fits)."""
    strategy: str = "guided"
    stop_reason: str = "exact"
    trials: list[Trial] = Field(default_factory=list)
    memory_line: MemoryLine | None = None
    """Peak reserved bytes ≈ fixed + per_sample × b, fitted to the passing trials."""
    capacity_bytes: int | None = None
    """Bytes the search was allowed to use (device memory less context overhead and margin)."""
    seconds: float = 0.0
    versions: dict[str, str] = Field(default_factory=dict)
    """torch, cuda, transformers, tuner versions of the process that probed."""
    alloc_conf: str | None = Field(
        default=None, max_length=500, validation_alias=AliasChoices("alloc_conf", "allocator_conf")
    )
    """The `PYTORCH_CUDA_ALLOC_CONF` the probe ran under (cuda) or modelled (estimate), in
    canonical form; None is PyTorch's default allocator. Part of the probe's cache key. Read from
    `allocator_conf` too, its name before."""

    @field_validator("alloc_conf")
    @classmethod
    def _canonical_alloc_conf(cls, value: str | None) -> str | None:
        return validated_alloc_conf(value)

    step: StepKind = "train"
    """The step the trials ran: `train` (the canonical train step) or `eval` (forward only under
    `torch.no_grad()`, the training state resident). Part of the probe's cache key."""
    parallelism: str = Field(default="", max_length=500)
    """The data-parallel job one rank of which was traced or run, as its probe key
    (`tuner.parallelism.ParallelismSpec.probe_key`: '' for a single process, e.g.
    `fsdp:param_dtype=none,reshard_after_forward=true,world_size=8`). Part of the cache key."""
    facts: WorkloadFacts | None = None
    verified_steps: int | None = None
    """Steps the answer survived in a fresh process (None: not verified)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Backend-specific details (e.g. the estimate's per-category bytes)."""


class LengthPoint(BaseModel):
    """One probed length of a token budget."""

    seq_len: int
    max_batch_size: int
    """The largest usable batch (within the memory budget) of rows of this length."""
    tokens: int
    """`max_batch_size × seq_len`."""
    probe_id: int | None = None


class TokenBudget(BaseModel):
    """The token budget of a plan whose sequence lengths vary (`tuner.token_budget`)."""

    min_seq_len: int
    seq_len: int
    max_tokens_per_micro_batch: int
    limiting_seq_len: int
    """The probed length whose largest batch set the budget."""
    lengths: list[LengthPoint]
    effective_tokens: int | None = None
    accumulation_steps: int | None = None
    """With `effective_tokens`: micro-batches of at most the budget per rank and optimizer step."""
    tokens_per_micro_batch: int | None = None
    """With `effective_tokens`: the tokens each micro-batch should hold to reach it exactly."""


class Plan(BaseModel):
    """What a training script applies (docs/contract.md "Plan")."""

    id: int | None = None
    created_at: datetime | None = None
    cache_hit: bool = False
    fingerprint: str
    workload: WorkloadSpec
    device: DeviceSpec
    backend: Backend
    effective_batch_size: int
    world_size: int
    micro_batch_size: int
    accumulation_steps: int
    micro_batch_sizes: list[int] | None = None
    """Per-rank micro-batches of one window, only when uneven (they sum to effective / world)."""
    gradient_checkpointing: bool
    max_micro_batch_size: dict[str, int]
    """Largest micro-batch per checkpointing choice probed: `{"off": 51, "on": 100}`."""
    memory_budget_bytes: int
    predicted_peak_bytes: int | None
    predicted_samples_per_second: float | None = None
    probe_id: int | None = None
    probe_ids: dict[str, int] = Field(default_factory=dict)
    """Probe id per checkpointing choice."""
    policy: PlanPolicy = Field(default_factory=PlanPolicy)
    reason: str = ""
    """Why this checkpointing choice and micro-batch."""
    warnings: list[str] = Field(default_factory=list)
    hints: list[str] = Field(default_factory=list)
    accumulation_schedule: list[dict[str, int]] | None = None
    """Batch-size ramp: `[{"until_step": s, "accumulation_steps": k}, ...]` at a fixed micro-batch."""
    versions: dict[str, str] = Field(default_factory=dict)
    alloc_conf: str | None = None
    """The `PYTORCH_CUDA_ALLOC_CONF` the plan assumes (the request's; None: PyTorch's default).
    Set it before the training process first touches CUDA."""
    eval_micro_batch_size: int | None = None
    """With `policy.eval`: the largest eval batch (forward only, no grad, training state
    resident) within the memory budget; None unless asked."""
    eval_predicted_peak_bytes: int | None = None
    """The eval micro-batch's predicted peak reserved bytes."""
    eval_probe_id: int | None = None
    max_tokens_per_micro_batch: int | None = None
    """With `inputs.min_seq_len`: the most tokens (rows × padded length) a micro-batch of any mix
    of lengths in [min_seq_len, seq_len] may hold; None unless lengths vary."""
    token_budget: TokenBudget | None = None
    """How the token budget was found (each probed length's largest batch) and, with
    `effective_tokens`, how to reach it."""
    parallelism: ParallelismSpec = NONE
    """How the ranks share the model (the request's, filled in): `micro_batch_size` and the
    memory are per rank of that job."""
    memory_per_rank: dict[str, int] | None = None
    """One rank's bytes per category (parameters, gradients, buckets, optimizer_state,
    activations) at the peak of the chosen probe's largest micro-batch (`micro_batch_size` key),
    as the estimate traced it; None where the probe did not trace it (the cuda backend)."""

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values (what the HTTP API returns): for a checkpoint, beside the
        model's and optimizer's state, so that a resumed run keeps the same micro-batch and
        accumulation steps, and the step counter keeps meaning the same samples."""
        dumped: dict[str, Any] = self.model_dump(mode="json")
        return dumped

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan `to_dict` saved. A spec read back is not checked against this process's
        factory allow-list (intake does that), so a plan for the script's own custom-code model
        reads back without `TUNER_ALLOWED_FACTORY_PACKAGES`."""
        return cls.model_validate(data)


def split_formula(plan: Plan) -> str:
    """The plan's effective batch as the product it is: `32 × 16 × 1` (micro-batch × accumulation
    steps × world size), an uneven window as `(6 × 47 + 5 × 46) × 1` (its micro-batches, largest
    first). The pages and the snippets that apply a plan write it so; the planner's words for a
    split are `tuner.planner.describe_split`."""
    if plan.micro_batch_sizes:
        counts: dict[int, int] = {}
        for size in plan.micro_batch_sizes:
            counts[size] = counts.get(size, 0) + 1
        window = " + ".join(f"{n} × {size}" for size, n in sorted(counts.items(), reverse=True))
        return f"({window}) × {plan.world_size}"
    return f"{plan.micro_batch_size} × {plan.accumulation_steps} × {plan.world_size}"
