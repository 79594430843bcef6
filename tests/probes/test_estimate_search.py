"""The largest micro-batch from estimates: `tuner.search.find_max_batch` over estimate trials,
guided by the estimate's own line, in a child process."""

from __future__ import annotations

from typing import Any

import pytest

from probes.child import run_in_child
from probes.estimate.device_model import DEFAULT_DEVICE_MODEL
from tests.probes.tiny_specs import WIDE_CNN
from tuner.spec import WorkloadSpec

TARGET_BATCH = 37


def _search(spec: WorkloadSpec, checkpointing: bool) -> dict[str, Any]:
    from probes.estimate.session import current_session, estimate_line, search_max_batch

    line = estimate_line(spec, gradient_checkpointing=checkpointing)
    # A card on which about TARGET_BATCH samples fit by the line.
    total = DEFAULT_DEVICE_MODEL.context_overhead_bytes + int(
        line.at(TARGET_BATCH) + line.per_sample_bytes / 2
    )
    result = search_max_batch(spec, total, gradient_checkpointing=checkpointing)
    session = current_session()
    best = result.max_batch_size
    return {
        "line": line,
        "result": result,
        "ok_at_best": session.trial(spec, best, total, gradient_checkpointing=checkpointing).ok,
        "ok_above": session.trial(spec, best + 1, total, gradient_checkpointing=checkpointing).ok,
    }


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_guided_search_finds_the_exact_boundary(checkpointing: bool) -> None:
    found: dict[str, Any] = run_in_child(
        _search, WIDE_CNN, checkpointing, timeout=600, what="estimate search"
    )
    result = found["result"]
    assert found["line"].per_sample_bytes > 2 * (1 << 20)
    assert found["ok_at_best"] and not found["ok_above"]
    # The line through b = 2 and 4 aims at TARGET_BATCH, but the allocator replay packs larger
    # batches tighter than small ones predict (with checkpointing, far tighter): the search
    # corrects it upwards in a few trials.
    assert TARGET_BATCH <= result.max_batch_size <= 2 * TARGET_BATCH
    assert result.stop_reason == "exact"
    assert len(result.trials) <= 6, [t.batch_size for t in result.trials]
    assert all(t.peak_reserved_bytes and t.peak_phase for t in result.trials)
