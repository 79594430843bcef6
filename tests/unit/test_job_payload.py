"""`tuner.job_payload`: the typed payload of a probe job, and the JSON its row stores."""

from __future__ import annotations

from typing import Any

import pytest

from tuner.errors import SpecError
from tuner.job_payload import ExtraProbe, JobPayload, parse_job_payload
from tuner.parallelism import SINGLE, ParallelismSpec, ParallelSetup
from tuner.spec import DeviceSpec, WorkloadSpec

WORKLOAD: dict[str, Any] = {
    "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64, "num_layers": 2}},
    "inputs": {"kind": "features", "dim": 32, "num_classes": 10},
    "precision": "fp32",
}
STORED_WORKLOAD = WorkloadSpec.model_validate(WORKLOAD).model_dump(mode="json")
"""The workload as a payload stores it: every default filled in."""
DEVICE = {"name": "Test GPU 1GiB", "total_memory_bytes": 1 << 30}
PREVIOUS_VERSION = {
    "workload": STORED_WORKLOAD,
    "device": DEVICE,
    "backend": "estimate",
    "gradient_checkpointing": [False, True],
    "torch_minor": "2.13",
    "alloc_conf": None,
}
"""A payload as the version before parallelism and extra probes stored it: neither key."""


def test_a_payload_stored_by_the_previous_version_still_parses() -> None:
    payload = JobPayload.model_validate(PREVIOUS_VERSION)
    assert payload.workload == WorkloadSpec.model_validate(WORKLOAD)
    assert payload.device == DeviceSpec.model_validate(DEVICE)
    assert (payload.backend, payload.gradient_checkpointing) == ("estimate", (False, True))
    assert (payload.torch_minor, payload.alloc_conf) == ("2.13", None)
    assert payload.parallel == SINGLE and payload.extra_probes == ()
    # Stored again, it gains only the key its reader fills in: the single process.
    assert payload.stored() == {**PREVIOUS_VERSION, "parallel": SINGLE.model_dump(mode="json")}
    assert parse_job_payload(PREVIOUS_VERSION) == payload


def test_the_stored_json_names_extra_probes_only_where_there_are_some() -> None:
    fsdp = ParallelSetup(parallelism=ParallelismSpec(strategy="fsdp"), world_size=4)
    payload = JobPayload.model_validate(
        {**PREVIOUS_VERSION, "device": None, "backend": "cuda", "parallel": fsdp.model_dump(mode="json")}
    )
    stored = payload.stored()
    assert "extra_probes" not in stored and stored["device"] is None
    assert JobPayload.model_validate(stored) == payload and payload.parallel == fsdp

    eval_probe = {
        "workload": STORED_WORKLOAD,
        "gradient_checkpointing": False,
        "step": "eval",
        "role": "eval",
    }
    with_extra = JobPayload.model_validate({**PREVIOUS_VERSION, "extra_probes": [eval_probe]})
    assert with_extra.extra_probes == (ExtraProbe.model_validate(eval_probe),)
    assert with_extra.stored()["extra_probes"] == [eval_probe]
    assert with_extra.workloads() == [with_extra.workload, with_extra.extra_probes[0].workload]


def test_keys_a_newer_version_adds_are_ignored() -> None:
    assert JobPayload.model_validate({**PREVIOUS_VERSION, "added_later": 1}) == JobPayload.model_validate(
        PREVIOUS_VERSION
    )


def test_a_payload_that_does_not_validate_is_the_clients_fault() -> None:
    with pytest.raises(SpecError, match=r"Invalid job payload: gradient_checkpointing: Field required"):
        parse_job_payload(
            {key: value for key, value in PREVIOUS_VERSION.items() if key != "gradient_checkpointing"}
        )
    with pytest.raises(SpecError, match=r"workload\.inputs\.dim"):
        parse_job_payload(
            {**PREVIOUS_VERSION, "workload": {**WORKLOAD, "inputs": {"kind": "features", "dim": 0}}}
        )


def test_a_worker_takes_in_only_the_factories_it_allows() -> None:
    factory = {"family": "python", "factory": "elsewhere.models:build", "kwargs": {}}
    foreign = {**PREVIOUS_VERSION, "workload": {**WORKLOAD, "model": factory}}
    # Stored, it validates wherever it is read; the worker that would import it refuses it.
    assert JobPayload.model_validate(foreign).workload.model.factory == "elsewhere.models:build"
    with pytest.raises(SpecError, match="package 'elsewhere' is not allowed"):
        parse_job_payload(foreign, allowed_factory_packages=["tests"])
    assert (
        parse_job_payload(foreign, allowed_factory_packages=["elsewhere"]).workload.model.family == "python"
    )
