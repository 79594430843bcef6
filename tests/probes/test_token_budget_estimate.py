"""The token budget against the estimate itself: a plan for lengths 64–256 on a small Llama-family
decoder, then each length traced again at the budget's limit (the ends, the middle, and a length
that was not probed) in a fresh estimate process: `budget // L` rows of L tokens fit the plan's
memory at every length, and one more row of the length that set the budget does not."""

from __future__ import annotations

from typing import Any

import pytest

from probes.estimate.remote import run_estimate_child
from tests.probes.tiny_specs import SMALL_LLAMA
from tuner.integration import probe_plan_locally
from tuner.planner import make_plan
from tuner.search_types import SearchConfig
from tuner.spec import DeviceSpec, WorkloadSpec, parse_plan_request

CARD = DeviceSpec(name="Test GPU 2GiB", total_memory_bytes=2 << 30)
LLAMA: dict[str, Any] = {**SMALL_LLAMA, "inputs": {**SMALL_LLAMA["inputs"], "min_seq_len": 64}}


def _trials_in_child(
    workload: WorkloadSpec, checks: list[tuple[int, int]], device_total: int
) -> list[tuple[int, int, bool, int]]:
    """(length, rows, fits the card, reserved bytes needed) for each (length, rows)."""
    from probes.estimate.session import current_session

    session = current_session()
    found = []
    for length, rows in checks:
        trial = session.trial(workload.at_length(length), rows, device_total)
        found.append((length, rows, trial.ok, int(trial.peak_reserved_bytes or 0)))
    return found


@pytest.fixture(scope="module")
def planned() -> Any:
    request = parse_plan_request(
        {
            "workload": LLAMA,
            "effective_batch_size": 32,
            "backend": "estimate",
            "device": CARD.model_dump(),
            "policy": {"gradient_checkpointing": "off"},
        }
    )
    probes, extras, _ = probe_plan_locally(request, search=SearchConfig(max_trials=24))
    return request, make_plan(request, probes, extras)


def test_the_budget_holds_at_both_ends_the_middle_and_between(planned: Any) -> None:
    request, plan = planned
    budget = plan.token_budget
    assert budget is not None and plan.max_tokens_per_micro_batch == budget.max_tokens_per_micro_batch
    assert [point.seq_len for point in budget.lengths] == [64, 160, 256]
    tokens = budget.max_tokens_per_micro_batch
    # Long rows cost more per token (attention, the logits' upcast): never fewer tokens fit short.
    by_length = {point.seq_len: point.tokens for point in budget.lengths}
    assert by_length[64] >= by_length[160] >= by_length[256] == tokens
    checks = [(length, tokens // length) for length in (64, 160, 256, 200, 100)]
    results = run_estimate_child(
        _trials_in_child, request.workload, checks, CARD.total_memory_bytes, timeout=600, what="budget check"
    )
    for length, rows, ok, needed in results:
        assert ok and needed <= plan.memory_budget_bytes, (length, rows, needed)


def test_one_more_row_of_the_limiting_length_does_not_fit(planned: Any) -> None:
    request, plan = planned
    budget = plan.token_budget
    length = budget.limiting_seq_len
    rows = budget.max_tokens_per_micro_batch // length
    ((_, _, at_limit, needed_at_limit), (_, _, beyond, needed_beyond)) = run_estimate_child(
        _trials_in_child,
        request.workload,
        [(length, rows), (length, rows + 1)],
        CARD.total_memory_bytes,
        timeout=600,
        what="budget edge",
    )
    assert at_limit and needed_at_limit <= plan.memory_budget_bytes
    assert not beyond or needed_beyond > plan.memory_budget_bytes
