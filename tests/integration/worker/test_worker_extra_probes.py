"""The worker runs the extra probes a job names (`policy.eval`, a token budget's lengths) with real
estimate probes in child processes, stores each under its own key and plans from all of them."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from storage import repository
from storage.models import ProbeRow
from tests.integration.worker.conftest import TEST_DEVICE, Queue
from tests.integration.worker.test_worker import make_worker


def decoder_request() -> dict[str, Any]:
    return {
        "workload": {
            "model": {
                "family": "builtin",
                "name": "decoder",
                "kwargs": {
                    "vocab_size": 512,
                    "hidden_size": 64,
                    "num_layers": 1,
                    "num_heads": 4,
                    "max_seq_len": 64,
                },
            },
            "inputs": {"kind": "tokens", "seq_len": 64, "min_seq_len": 16},
            "precision": "fp32",
        },
        "effective_batch_size": 64,
        "effective_tokens": 4096,
        "device": TEST_DEVICE,
        "backend": "estimate",
        "policy": {"gradient_checkpointing": "off", "eval": True},
    }


@pytest.mark.slow
def test_a_job_with_eval_and_lengths_probes_each_and_plans_from_them(queue: Queue) -> None:
    job = queue.enqueue(decoder_request())
    assert [extra["role"] for extra in job.payload["extra_probes"]] == ["eval", "length", "length"]
    worker = make_worker(queue.engine, "extras")
    assert worker.run_once() is True
    done = queue.job(job.id)
    assert done.status == "succeeded", done.error
    with queue.engine.connect() as connection:
        rows = connection.execute(select(ProbeRow.step, ProbeRow.workload).order_by(ProbeRow.id)).all()
    kinds = [(step, workload["inputs"]["seq_len"]) for step, workload in rows]
    assert kinds == [("train", 64), ("eval", 64), ("train", 16), ("train", 40)]
    (waiter,) = repository.list_waiters(queue.engine, job_id=job.id)
    assert waiter.plan_id is not None
    plan = repository.get_plan(queue.engine, plan_id=waiter.plan_id)
    assert plan.eval_micro_batch_size is not None and plan.eval_micro_batch_size > plan.micro_batch_size
    assert plan.token_budget is not None and [p.seq_len for p in plan.token_budget.lengths] == [16, 40, 64]
    assert plan.max_tokens_per_micro_batch == min(p.tokens for p in plan.token_budget.lengths)
    assert plan.token_budget.effective_tokens == 4096
    # The same request again: every probe cached, the stored plan returned without a job.
    again = queue.enqueue(decoder_request())
    assert again.id != job.id
    assert worker.run_once() is True
    assert queue.job(again.id).status == "succeeded"
    with queue.engine.connect() as connection:
        assert len(connection.execute(select(ProbeRow.id)).all()) == 4
