"""Probe results (the cache) and plans round-trip, and plans list, filter and paginate."""

from __future__ import annotations

import pytest

from storage.repository import (
    find_cached_probe,
    get_plan,
    get_plan_request,
    get_probe,
    list_plans,
    save_plan,
    save_probe,
    torch_minor,
)
from tests.integration.storage.conftest import Database
from tests.integration.storage.factories import (
    A100,
    H100,
    gpt2_workload,
    mlp_workload,
    plan,
    plan_request,
    probe_result,
)
from tuner.errors import NotFoundError
from tuner.probe_key import ProbeKey


def test_probe_result_round_trips_with_every_trial(database: Database) -> None:
    stored = probe_result()
    with database.sessions() as session:
        probe_id = save_probe(session, result=stored)
    with database.sessions() as session:
        loaded = get_probe(session, probe_id=probe_id)
    assert loaded.id == probe_id
    assert loaded.created_at is not None and loaded.created_at.utcoffset() is not None
    assert loaded.model_dump(exclude={"id", "created_at"}) == stored.model_dump(exclude={"id", "created_at"})
    assert [t.batch_size for t in loaded.trials] == [48, 52, 51]
    assert loaded.trials[0].peak_reserved_bytes == 74 << 30  # beyond 32 bits


def test_cache_lookup_matches_every_part_of_the_key(database: Database) -> None:
    workload = gpt2_workload()
    key = {
        "fingerprint": workload.fingerprint(),
        "device_name": H100.name,
        "device_memory_bytes": H100.total_memory_bytes,
        "backend": "cuda",
        "torch_minor": "2.13",
        "gradient_checkpointing": False,
        "alloc_conf": "expandable_segments:True",
    }
    with database.sessions() as session:
        assert find_cached_probe(session, ProbeKey(**key)) is None
        first = save_probe(session, result=probe_result(workload=workload, max_batch_size=50))
        # A later patch release has the same cache key: the first stored result stays the answer.
        again = save_probe(session, result=probe_result(workload=workload, torch_version="2.13.2"))
        save_probe(session, result=probe_result(workload=workload, gradient_checkpointing=True))
        save_probe(session, result=probe_result(workload=workload, device=A100))
        save_probe(session, result=probe_result(workload=workload, torch_version="2.12.1"))
        default_allocator = save_probe(session, result=probe_result(workload=workload, alloc_conf=None))

        hit = find_cached_probe(session, ProbeKey(**key))
        assert hit is not None and hit.id == first == again and hit.max_batch_size == 50
        misses = [
            {"fingerprint": gpt2_workload(n_layer=3).fingerprint()},
            {"device_name": "NVIDIA H100 PCIe"},
            {"device_memory_bytes": H100.total_memory_bytes - 1},
            {"backend": "estimate"},
            {"torch_minor": "2.14"},
            {"alloc_conf": "expandable_segments:True,max_split_size_mb:128"},
        ]
        for change in misses:
            assert find_cached_probe(session, ProbeKey(**{**key, **change})) is None, change
        other_allocator = find_cached_probe(session, ProbeKey(**{**key, "alloc_conf": None}))
        assert other_allocator is not None and other_allocator.id == default_allocator != first
        assert other_allocator.alloc_conf is None
        checkpointed = find_cached_probe(session, ProbeKey(**{**key, "gradient_checkpointing": True}))
        assert checkpointed is not None and checkpointed.gradient_checkpointing
        on_a100 = find_cached_probe(
            session,
            ProbeKey(**{**key, "device_name": A100.name, "device_memory_bytes": A100.total_memory_bytes}),
        )
        assert on_a100 is not None and on_a100.device == A100


@pytest.mark.parametrize(
    ("version", "minor"),
    [("2.13.0", "2.13"), ("2.13.1+cu126", "2.13"), ("2.14.0.dev20260101", "2.14"), ("", "unknown")],
)
def test_torch_minor(version: str, minor: str) -> None:
    assert torch_minor(version) == minor


def test_plan_round_trips_with_its_request(database: Database) -> None:
    workload = gpt2_workload()
    with database.sessions() as session:
        probe_id = save_probe(session, result=probe_result(workload=workload))
        stored = plan(workload=workload, probe_id=probe_id)
        plan_id = save_plan(session, plan=stored, request=plan_request(workload))
    with database.sessions() as session:
        loaded = get_plan(session, plan_id=plan_id)
        assert get_plan_request(session, plan_id=plan_id) == plan_request(workload)
    assert loaded.id == plan_id and loaded.created_at is not None
    assert loaded.model_dump(exclude={"id", "created_at"}) == stored.model_dump(exclude={"id", "created_at"})


def test_missing_rows_are_not_found(database: Database) -> None:
    with database.sessions() as session:
        with pytest.raises(NotFoundError, match="No plan with id 99"):
            get_plan(session, plan_id=99)
        with pytest.raises(NotFoundError, match="No probe result with id 99"):
            get_probe(session, probe_id=99)


def test_plans_list_newest_first_filter_and_paginate(database: Database) -> None:
    gpt2, mlp = gpt2_workload(), mlp_workload()
    saved: list[int] = []
    with database.sessions() as session:
        for index in range(7):
            workload = gpt2 if index % 2 == 0 else mlp  # gpt2: 0 2 4 6; mlp: 1 3 5
            device = H100 if index < 5 else A100
            backend = "estimate" if index == 6 else "cuda"
            saved.append(
                save_plan(
                    session,
                    plan=plan(workload=workload, device=device, backend=backend, micro_batch_size=2**index),
                    # Distinct requests: one request from the same probes is one stored plan.
                    request=plan_request(workload, device, effective_batch_size=512 + index),
                )
            )
    newest_first = saved[::-1]
    with database.sessions() as session:
        pages = [list_plans(session, limit=3, offset=offset) for offset in (0, 3, 6, 9)]
        assert [total for _, total in pages] == [7, 7, 7, 7]
        assert [[p.id for p in page] for page, _ in pages] == [
            newest_first[0:3],
            newest_first[3:6],
            newest_first[6:7],
            [],
        ]

        by_model, total = list_plans(session, limit=10, model="gpt2")
        assert total == 4 and [p.id for p in by_model] == [saved[6], saved[4], saved[2], saved[0]]
        assert all(p.workload == gpt2 for p in by_model)

        by_fingerprint, total = list_plans(session, limit=2, fingerprint=mlp.fingerprint())
        assert total == 3 and [p.id for p in by_fingerprint] == [saved[5], saved[3]]

        on_a100, total = list_plans(session, limit=10, device_name=A100.name)
        assert total == 2 and {p.id for p in on_a100} == {saved[5], saved[6]}

        combined, total = list_plans(session, limit=10, model="gpt2", device_name=A100.name, backend="cuda")
        assert total == 0 and combined == []
        estimated, total = list_plans(session, limit=10, backend="estimate", family="transformers")
        assert (
            total == 1 and estimated[0].id == saved[6] and estimated[0].predicted_samples_per_second is None
        )

        builtin, total = list_plans(session, limit=10, model="mlp", family="builtin")
        assert total == 3 and {p.micro_batch_size for p in builtin} == {2, 8, 32}
