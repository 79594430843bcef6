"""Stored, then read back: the same probe result and the same plan, for generated ones.

Every field of a `Trial` and of a `ProbeResult` has a column or a JSON field that keeps it; a
field added to the domain types without one (as `Trial.step_seconds` once was) fails here on
both databases. Plans are the planner's own, derived from the generated probes.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from storage.repository import get_plan, get_probe, save_plan, save_probe
from tests.integration.storage.conftest import Database
from tests.integration.storage.factories import mlp_workload
from tuner.errors import TunerError
from tuner.planner import make_plan
from tuner.results import ProbeResult
from tuner.search_types import MemoryLine, Move, Trial
from tuner.spec import DeviceSpec, PlanRequest, parse_plan_request

_UNIQUE = itertools.count()
# What a row can hold on both databases: no NUL (PostgreSQL text), no lone surrogates (UTF-8).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
SECONDS = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
BYTES = st.integers(min_value=0, max_value=1 << 50)

trials = st.builds(
    Trial,
    batch_size=st.integers(min_value=1, max_value=1 << 20),
    ok=st.booleans(),
    peak_allocated_bytes=st.none() | BYTES,
    peak_reserved_bytes=st.none() | BYTES,
    seconds=SECONDS,
    num_alloc_retries=st.none() | st.integers(min_value=0, max_value=10_000),
    samples_per_second=st.none() | SECONDS,
    step_seconds=st.none() | SECONDS,
    peak_phase=st.none() | st.sampled_from(["forward", "backward", "optimizer"]),
    error=st.none() | st.just("out_of_memory") | TEXT,
    move=st.none() | st.sampled_from(list(Move)),
)


@st.composite
def probe_results(draw: st.DrawFn) -> ProbeResult:
    workload = mlp_workload()
    # A device of its own per example: every generated result has a cache key of its own.
    device = DeviceSpec(
        name=f"Generated GPU {next(_UNIQUE)} {draw(TEXT)}"[:200],
        total_memory_bytes=draw(st.integers(min_value=1 << 30, max_value=1 << 40)),
    )
    return ProbeResult(
        fingerprint=workload.fingerprint(),
        workload=workload,
        device=device,
        backend=draw(st.sampled_from(["cuda", "estimate"])),
        gradient_checkpointing=draw(st.booleans()),
        max_batch_size=draw(st.integers(min_value=0, max_value=1 << 20)),
        strategy=draw(st.sampled_from(["guided", "binary", "doubling"])),
        stop_reason=draw(st.sampled_from(["exact", "tolerance", "max_batch_size", "max_trials"])),
        trials=draw(st.lists(trials, max_size=8)),
        memory_line=draw(
            st.none()
            | st.builds(MemoryLine, fixed_bytes=st.floats(0, 1e11), per_sample_bytes=st.floats(1.0, 1e10))
        ),
        capacity_bytes=draw(st.none() | BYTES),
        seconds=draw(SECONDS),
        versions={"torch": draw(st.sampled_from(["2.13.0", "2.12.1+cu126"])), "tuner": "0.1.0"},
        alloc_conf=draw(st.sampled_from([None, "expandable_segments:True"])),
        verified_steps=draw(st.none() | st.integers(min_value=0, max_value=100)),
        extra={"note": draw(TEXT)},
    )


def _request_for(probe: ProbeResult, effective_batch_size: int, world_size: int) -> PlanRequest:
    return parse_plan_request(
        {
            "workload": probe.workload.model_dump(mode="json"),
            "effective_batch_size": effective_batch_size,
            "world_size": world_size,
            "device": probe.device.model_dump(mode="json"),
            "backend": probe.backend,
            "policy": {"gradient_checkpointing": "on" if probe.gradient_checkpointing else "off"},
            "alloc_conf": probe.alloc_conf,
        }
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(probe=probe_results())
def test_a_stored_probe_reads_back_as_stored(database: Database, probe: ProbeResult) -> None:
    probe_id = save_probe(database.engine, result=probe)
    loaded = get_probe(database.engine, probe_id=probe_id)
    assert loaded.model_dump(exclude={"id", "created_at"}) == probe.model_dump(exclude={"id", "created_at"})


@st.composite
def plannable_probe_results(draw: st.DrawFn) -> ProbeResult:
    """A generated probe that some plan can use: at least one sample fits, measured well within
    any card's budget (the rest of it as generated). Without it most generated probes plan
    nothing, and filtering them out trips Hypothesis's health check."""
    probe = draw(probe_results())
    fits_one = Trial(
        batch_size=1, ok=True, peak_allocated_bytes=1 << 20, peak_reserved_bytes=1 << 20, seconds=0.1
    )
    return probe.model_copy(
        update={"max_batch_size": max(1, probe.max_batch_size), "trials": [fits_one, *probe.trials]}
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    probe=plannable_probe_results(),
    per_rank_batch=st.integers(min_value=1, max_value=512),
    world_size=st.integers(min_value=1, max_value=8),
)
def test_a_stored_plan_reads_back_as_stored(
    database: Database, probe: ProbeResult, per_rank_batch: int, world_size: int
) -> None:
    probe = probe.model_copy(update={"id": save_probe(database.engine, result=probe)})
    # A multiple of the world size: every rank contributes the same number of samples.
    request = _request_for(probe, per_rank_batch * world_size, world_size)
    try:
        plan = make_plan(request, {probe.gradient_checkpointing: probe})
    except TunerError:
        assume(False)  # what little the generated probe still leaves unplannable
        return
    plan_id = save_plan(database.engine, plan=plan, request=request.model_dump(mode="json"))
    loaded = get_plan(database.engine, plan_id=plan_id)
    assert loaded.model_dump(exclude={"id", "created_at"}) == plan.model_dump(exclude={"id", "created_at"})
