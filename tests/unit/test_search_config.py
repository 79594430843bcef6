"""`SearchConfig`: one checked object for a search's settings, from the caller down to
`tuner.search.run_search`, and the plan's cap that a local probe maps onto it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.unit.synthetic_devices import table
from tuner.errors import SpecError
from tuner.integration import search_for
from tuner.plan_probes import ProbeNeed, extra_needs, probed_workload
from tuner.search import find_max_batch, run_search
from tuner.search_types import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_TRIALS, DEFAULT_SEARCH, SearchConfig
from tuner.spec import PlanRequest, parse_plan_request

DEVICE = next(iter(table()))
WORKLOAD: dict[str, Any] = {
    "model": {"family": "builtin", "name": "decoder", "kwargs": {}},
    "inputs": {"kind": "tokens", "seq_len": 256, "min_seq_len": 64},
}


def plan_request(**policy: Any) -> PlanRequest:
    return parse_plan_request(
        {
            "workload": WORKLOAD,
            "effective_batch_size": 64,
            "device": {"name": "card", "total_memory_bytes": 8 << 30},
            "backend": "estimate",
            "policy": policy,
        }
    )


def test_the_defaults_are_the_searchs_defaults() -> None:
    assert (DEFAULT_SEARCH.strategy, DEFAULT_SEARCH.min_batch_size, DEFAULT_SEARCH.tolerance) == (
        "guided",
        1,
        0,
    )
    assert (DEFAULT_SEARCH.max_batch_size, DEFAULT_SEARCH.max_trials) == (
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MAX_TRIALS,
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strategy": "random"}, "Unknown search strategy 'random': use one of guided, doubling, backoff"),
        ({"min_batch_size": 0}, "min_batch_size must be at least 1, got 0"),
        ({"min_batch_size": 8, "max_batch_size": 4}, r"max_batch_size \(4\) is below min_batch_size \(8\)"),
        ({"max_trials": 0}, "max_trials must be at least 1, got 0"),
        ({"tolerance": -1}, "tolerance must not be negative, got -1"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        SearchConfig(**fields)
    with pytest.raises(SpecError, match=message):
        dataclasses.replace(DEFAULT_SEARCH, **fields)  # a changed copy is checked too


def test_a_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_SEARCH.max_trials = 3  # type: ignore[misc]


@pytest.mark.parametrize("strategy", ["guided", "doubling", "backoff"])
def test_run_search_is_find_max_batch_with_its_keywords_in_one_object(strategy: str) -> None:
    keywords: dict[str, Any] = {"min_batch_size": 2, "max_batch_size": 300, "max_trials": 9, "tolerance": 1}
    config = SearchConfig(strategy=strategy, **keywords)  # type: ignore[arg-type]
    by_config = run_search(DEVICE.fresh().fits, config, capacity_bytes=DEVICE.capacity)
    by_keywords = find_max_batch(
        DEVICE.fresh().fits,
        strategy=strategy,  # type: ignore[arg-type]
        capacity_bytes=DEVICE.capacity,
        **keywords,
    )
    assert by_config == by_keywords and len(by_config.trials) <= 9


def test_a_local_train_probe_stops_at_the_plans_cap_and_the_others_search_on() -> None:
    capped = plan_request(max_micro_batch_size=48, eval=True)
    base = SearchConfig(strategy="doubling", max_trials=12)
    assert search_for(capped) == dataclasses.replace(DEFAULT_SEARCH, max_batch_size=48)
    train = ProbeNeed(probed_workload(capped.workload), False)
    assert search_for(capped, train, base) == dataclasses.replace(base, max_batch_size=48)
    extras = extra_needs(capped)
    assert {need.role for need in extras} == {"eval", "length"}
    assert all(search_for(capped, need, base) == base for need in extras)
    # No cap: the search as given, its own upper bound (which a cap may exceed: it replaces it).
    assert search_for(plan_request(), train, base) == base
    above = plan_request(max_micro_batch_size=DEFAULT_MAX_BATCH_SIZE + 1)
    assert search_for(above, train).max_batch_size == DEFAULT_MAX_BATCH_SIZE + 1
