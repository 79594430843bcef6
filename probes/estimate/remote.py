"""Estimates from any process: each call runs in a fresh child process, which installs the
CUDA emulation there and never here. Importing this module does not import torch, so the API
process and the CLI can call it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuner.errors import EstimateError, ModelBuildError, SpecError
from tuner.search_types import DEFAULT_SEARCH, SearchConfig
from tuner.settings import DEFAULT_ESTIMATE_TIMEOUT_SECONDS
from tuner.spec import StepKind, WorkloadSpec

if TYPE_CHECKING:
    from probes.estimate.report import EstimateReport
    from tuner.search_types import SearchResult


def estimate_peak(
    spec: WorkloadSpec,
    batch_size: int,
    *,
    gradient_checkpointing: bool = False,
    timeout: float | None = None,
    alloc_conf: str | None = None,
    step: StepKind = "train",
) -> EstimateReport:
    """The estimate of one train step (`step="eval"`: eval step) of `spec` at `batch_size`,
    traced in a fresh child.

    A trace that fails is an `EstimateError` (a model that cannot be built at all stays a
    `ModelBuildError`); so is a child that crashes or runs past `timeout` seconds (the caller's
    `estimate_timeout_seconds` setting; default `DEFAULT_ESTIMATE_TIMEOUT_SECONDS`)."""
    report: EstimateReport = run_estimate_child(
        _trace_in_child,
        spec,
        batch_size,
        gradient_checkpointing,
        alloc_conf,
        step,
        timeout=timeout,
        what=f"estimate of {spec.describe()} at batch size {batch_size}",
    )
    return report


def estimate_max_batch(
    spec: WorkloadSpec,
    device_total_bytes: int,
    *,
    gradient_checkpointing: bool,
    memory_margin: float = 0.0,
    search: SearchConfig = DEFAULT_SEARCH,
    timeout: float | None = None,
    alloc_conf: str | None = None,
) -> SearchResult:
    """The largest micro-batch whose predicted reserved peak fits a card of
    `device_total_bytes` less the margin (`probes.estimate.session.search_max_batch`), searched
    as `search` says in a fresh child."""
    result: SearchResult = run_estimate_child(
        _search_in_child,
        spec,
        device_total_bytes,
        gradient_checkpointing,
        memory_margin,
        search,
        alloc_conf,
        timeout=timeout,
        what=f"estimate search of {spec.describe()}",
    )
    return result


def run_estimate_child(fn: Callable[..., Any], *args: Any, timeout: float | None, what: str) -> Any:
    """`fn(*args)` in a fresh child; its failures as `EstimateError` (a model that cannot be
    built stays a `ModelBuildError`, a bad argument a `SpecError`)."""
    from probes.child import ChildFailed, run_in_child

    limit = timeout if timeout is not None else DEFAULT_ESTIMATE_TIMEOUT_SECONDS
    try:
        return run_in_child(fn, *args, timeout=limit, what=what)
    except ChildFailed as exc:
        # `from exc`: the child's traceback stays reachable (`probes.child.child_traceback`).
        if exc.failure.error_code == ModelBuildError.code:
            raise ModelBuildError(exc.failure.message) from exc
        if exc.failure.error_code == SpecError.code:
            raise SpecError(exc.failure.message) from exc
        raise EstimateError(exc.failure.message) from exc


def _trace_in_child(
    spec: WorkloadSpec,
    batch_size: int,
    gradient_checkpointing: bool,
    alloc_conf: str | None,
    step: StepKind = "train",
) -> EstimateReport:
    from probes.estimate.session import current_session

    return current_session().trace(
        spec, batch_size, gradient_checkpointing=gradient_checkpointing, alloc_conf=alloc_conf, step=step
    )


def _search_in_child(
    spec: WorkloadSpec,
    device_total_bytes: int,
    gradient_checkpointing: bool,
    memory_margin: float,
    search: SearchConfig,
    alloc_conf: str | None,
) -> SearchResult:
    from probes.estimate.session import search_max_batch

    return search_max_batch(
        spec,
        device_total_bytes,
        gradient_checkpointing=gradient_checkpointing,
        memory_margin=memory_margin,
        search=search,
        alloc_conf=alloc_conf,
    )
