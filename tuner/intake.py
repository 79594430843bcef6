"""What a plan request can be refused for before any probe: a card whose memory budget cannot
even hold the model's parameters with their gradients and optimizer state.

Pure and torch-free (the API runs it on every request that misses the cache). The parameter
count is a floor the transformers table vouches for (`tuner.config_keys.parameter_floor`), so a
refusal here is certain: the real model has more parameters, and training needs activations on
top. Requests this cannot decide go on to the probe, which answers exactly.
"""

from __future__ import annotations

from tuner.config_keys import parameter_floor
from tuner.errors import NothingFitsError
from tuner.planner import memory_budget
from tuner.spec import PlanRequest, WorkloadSpec
from tuner.units import format_bytes

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0}
"""Tensors of a parameter's size each optimizer keeps per parameter (SGD: the momentum buffer;
Adafactor's factored statistics are counted as none)."""


def bytes_per_parameter(workload: WorkloadSpec) -> int:
    """Weight, gradient and optimizer-state bytes of one parameter: fp32 weights (4 bytes) unless
    the precision is pure `bf16` (2), gradients and states in the weights' dtype."""
    weight = 2 if workload.precision == "bf16" else 4
    return weight * (2 + OPTIMIZER_STATES[workload.optimizer.name])


def minimum_bytes(workload: WorkloadSpec) -> tuple[int, int] | None:
    """(parameters at least, bytes they take with gradients and optimizer state), or None where no
    floor is known for the workload's model."""
    if workload.model.family != "transformers" or workload.model.config is None:
        return None
    parameters = parameter_floor(workload.model.config)
    if parameters is None:
        return None
    return parameters, parameters * bytes_per_parameter(workload)


def refuse_what_cannot_fit(request: PlanRequest) -> None:
    """Raise `NothingFitsError` when the request's device cannot hold the model's parameters,
    gradients and optimizer state within the plan's memory budget (a device-less request and a
    model without a known floor pass)."""
    if request.device is None:
        return
    floor = minimum_bytes(request.workload)
    if floor is None:
        return
    parameters, needed = floor
    sharded = request.chosen_parallelism.strategy == "fsdp" and request.world_size > 1
    if sharded:
        needed = -(-needed // request.world_size)  # FSDP: each rank holds its shard of them
    budget = memory_budget(request.device.total_memory_bytes, request.policy.memory_margin)
    if needed <= budget:
        return
    workload = request.workload
    share = f"one rank's 1/{request.world_size} of " if sharded else ""
    raise NothingFitsError(
        f"Nothing fits: this {workload.describe()} config has at least {parameters / 1e9:.2f} billion "
        f"parameters, {share}whose weights, gradients and {workload.optimizer.name} state "
        f"({bytes_per_parameter(workload)} bytes each in {workload.precision}) alone take at least "
        f"{format_bytes(needed)}, more than the memory budget of {format_bytes(budget)} on "
        f"{request.device.name} ({format_bytes(request.device.total_memory_bytes)}, "
        f"{request.policy.memory_margin:.0%} margin), before any activation."
    )
