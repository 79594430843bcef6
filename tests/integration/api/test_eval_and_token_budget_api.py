"""`policy.eval`, `inputs.min_seq_len` and `effective_tokens` through a real uvicorn server on
SQLite and PostgreSQL: the extra probes are looked up by their own keys (the eval step's kind,
each length's fingerprint), an uncached one queues a job that names it, and bad input is a 422
naming the field.

Probe results are seeded through the repository (`seeding`), shaped like real ones: a memory
line per length whose per-sample bytes grow faster than the length (attention's quadratic term).
"""

from __future__ import annotations

from typing import Any

from storage import repository
from tests.integration.api.conftest import Server, error_of
from tests.integration.api.seeding import DEVICE, TORCH_VERSION
from tuner.plan_probes import ExtraProbes, extra_needs
from tuner.planner import make_plan
from tuner.results import ProbeResult
from tuner.search_types import MemoryLine, Trial
from tuner.spec import StepKind, WorkloadSpec, parse_plan_request, parse_workload

QUEUE_ANYWAY = {"queue_without_worker": "true"}


def decoder(dim: int) -> WorkloadSpec:
    return parse_workload(
        {
            "model": {
                "family": "builtin",
                "name": "decoder",
                "kwargs": {"hidden_size": dim, "num_layers": 2, "max_seq_len": 512},
            },
            "inputs": {"kind": "tokens", "seq_len": 512},
        }
    )


def seeded(
    workload: WorkloadSpec, *, checkpointing: bool = False, step: StepKind = "train", seq_len: int = 512
) -> ProbeResult:
    """A probe at `seq_len`: 200 MB fixed, per sample 40 kB × L + 30 B × L² (8× cheaper in eval)."""
    per_sample = 40e3 * seq_len + 30 * seq_len**2
    line = MemoryLine(fixed_bytes=200e6, per_sample_bytes=per_sample / (8 if step == "eval" else 1))
    largest = line.largest_batch_under(DEVICE.total_memory_bytes * 0.95)
    trials = [
        Trial(batch_size=b, ok=b <= largest, peak_reserved_bytes=int(line.at(b)) if b <= largest else None)
        for b in (1, largest, largest + 1)
    ]
    probed = workload.at_length(seq_len)
    return ProbeResult(
        fingerprint=probed.fingerprint(),
        workload=probed,
        device=DEVICE,
        backend="estimate",
        gradient_checkpointing=checkpointing,
        max_batch_size=largest,
        trials=trials,
        memory_line=line,
        capacity_bytes=int(DEVICE.total_memory_bytes * 0.95),
        versions={"torch": TORCH_VERSION},
        step=step,
    )


def body(workload: WorkloadSpec, **extra: Any) -> dict[str, Any]:
    inputs = {**workload.inputs.model_dump(mode="json"), **extra.pop("inputs", {})}
    return {
        "workload": {**workload.model_dump(mode="json"), "inputs": inputs},
        "effective_batch_size": 16,
        "backend": "estimate",
        "device": DEVICE.model_dump(mode="json"),
        "policy": {"gradient_checkpointing": "off", **extra.pop("policy", {})},
        **extra,
    }


def test_eval_and_token_budget_come_from_their_own_probes(server: Server) -> None:
    workload = decoder(64)
    train = repository.save_probe(server.engine, result=seeded(workload))
    evaluation = repository.save_probe(server.engine, result=seeded(workload, step="eval"))
    lengths = {
        length: repository.save_probe(server.engine, result=seeded(workload, seq_len=length))
        for length in (64, 288)
    }
    request = body(workload, inputs={"min_seq_len": 64}, policy={"eval": True}, effective_tokens=20_000)
    with server.authorized() as client:
        answer = client.post("/v1/plans", json=request)
        assert answer.status_code == 200, answer.text
        plan = answer.json()
    assert plan["probe_id"] == train and plan["eval_probe_id"] == evaluation
    # What the planner derives from the same probes.
    extras = ExtraProbes(
        eval=repository.get_probe(server.engine, probe_id=evaluation),
        lengths={n: {False: repository.get_probe(server.engine, probe_id=i)} for n, i in lengths.items()},
    )
    expected = make_plan(
        parse_plan_request(request), {False: repository.get_probe(server.engine, probe_id=train)}, extras
    )
    assert plan["eval_micro_batch_size"] == expected.eval_micro_batch_size > plan["micro_batch_size"]
    assert plan["max_tokens_per_micro_batch"] == expected.max_tokens_per_micro_batch
    budget = plan["token_budget"]
    assert [point["seq_len"] for point in budget["lengths"]] == [64, 288, 512]
    assert budget["limiting_seq_len"] == 512  # long rows cost more per token
    assert budget["accumulation_steps"] * budget["max_tokens_per_micro_batch"] >= 20_000
    assert any("GradientAccumulator" in hint for hint in plan["hints"])


def test_an_uncached_eval_probe_queues_a_job_that_names_it(server: Server) -> None:
    workload = decoder(72)
    repository.save_probe(server.engine, result=seeded(workload))
    request = body(workload, policy={"eval": True})
    with server.authorized() as client:
        queued = client.post("/v1/plans", params=QUEUE_ANYWAY, json=request)
        assert queued.status_code == 202, queued.text
        job = repository.get_job(server.engine, job_id=queued.json()["id"])
    assert [extra["step"] for extra in job.payload["extra_probes"]] == ["eval"]
    needs = extra_needs(parse_plan_request(request))
    assert job.payload["extra_probes"][0]["workload"] == needs[0].workload.model_dump(mode="json")
    # A request without policy.eval is a different job, planned from the train probe alone.
    with server.authorized() as client:
        plain = client.post("/v1/plans", json=body(workload))
        assert plain.status_code == 200, plain.text
        assert plain.json()["eval_micro_batch_size"] is None


def test_bad_lengths_and_token_targets_are_422_naming_the_field(server: Server) -> None:
    workload = decoder(80)
    repository.save_probe(server.engine, result=seeded(workload))
    for length in (64, 288):
        repository.save_probe(server.engine, result=seeded(workload, seq_len=length))
    cases = {
        "workload.inputs: min_seq_len (600) must not exceed seq_len (512)": body(
            workload, inputs={"min_seq_len": 600}
        ),
        "workload.inputs.min_seq_len": body(workload, inputs={"min_seq_len": 0}),
        "effective_tokens needs workload.inputs.min_seq_len": body(workload, effective_tokens=4096),
        "effective_tokens (100) is not reachable": body(
            workload, inputs={"min_seq_len": 64}, effective_tokens=100
        ),
        "effective_tokens (4097) is not divisible by the world size (2)": {
            **body(workload, inputs={"min_seq_len": 64}, effective_tokens=4097),
            "world_size": 2,
        },
    }
    with server.authorized() as client:
        for needle, request in cases.items():
            answer = client.post("/v1/plans", json=request)
            assert answer.status_code == 422, (needle, answer.text)
            assert needle in error_of(answer)["detail"], (needle, answer.text)
