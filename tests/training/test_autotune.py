"""autotune: the search with the caller's own step, OOM caught by type, the result uploaded."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from storage import repository
from tests.integration.api.seeding import seed_probes
from tests.training.conftest import Service
from tuner.autotuning import autotune
from tuner.client import TunerClient
from tuner.errors import SpecError
from tuner.spec import DeviceSpec, PlanRequest, parse_workload

pytest.importorskip("tuner.search")

DEVICE = DeviceSpec(name="cpu (test)", total_memory_bytes=1 << 30)
WORKLOAD = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 16, "num_layers": 1}},
        "inputs": {"kind": "features", "dim": 8},
        "precision": "fp32",
    }
)


def memory_limited_step(limit: int, calls: list[int]) -> Callable[[int], None]:
    """A real training step of a small MLP that runs out of memory above `limit` samples, the
    way the CUDA allocator reports it: by raising `torch.OutOfMemoryError` mid-step."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch_size: int) -> None:
        calls.append(batch_size)
        features = torch.randn(batch_size, 8)
        loss = nn.functional.cross_entropy(model(features), torch.randint(0, 3, (batch_size,)))
        if batch_size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size} MiB")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize(
    ("strategy", "limit"),
    [("guided", 1), ("doubling", 37), pytest.param("guided", 300, marks=pytest.mark.slow)],
)
def test_finds_the_largest_batch_exactly(strategy: str, limit: int) -> None:
    calls: list[int] = []
    result = autotune(
        memory_limited_step(limit, calls),
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DEVICE,
        strategy=strategy,
        max_batch_size=4096,
        upload=False,
    )
    assert result.max_batch_size == limit
    assert result.stop_reason == "exact"
    assert {t.batch_size for t in result.trials if t.ok} <= set(range(1, limit + 1))
    assert all(t.error == "out_of_memory" for t in result.trials if not t.ok)
    assert any(not t.ok and t.batch_size == limit + 1 for t in result.trials)
    # Two steps per passing trial (the optimizer's state appears at the first step).
    assert len(calls) == sum(2 if t.ok else 1 for t in result.trials)
    assert result.backend == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result.extra["source"] == "autotune"
    assert result.fingerprint == WORKLOAD.fingerprint() and result.device == DEVICE


def test_nothing_fits_gives_zero() -> None:
    result = autotune(
        memory_limited_step(0, []),
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DEVICE,
        upload=False,
    )
    assert result.max_batch_size == 0 and result.stop_reason == "nothing_fits"


def test_an_error_that_is_not_out_of_memory_propagates() -> None:
    def broken_step(batch_size: int) -> None:
        raise RuntimeError("CUDA out of memory")  # the message alone must not count as an OOM

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        autotune(
            broken_step, fingerprint=WORKLOAD.fingerprint(), workload=WORKLOAD, device=DEVICE, upload=False
        )


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Cycle:
    def __init__(self, payload: torch.Tensor) -> None:
        self.payload = payload
        self.me = self


def test_memory_of_a_failed_trial_is_released_before_the_next(gc_disabled: None) -> None:
    """A failed step leaves a reference cycle holding its activations; the next trial must not
    start with them still alive."""
    left_behind: list[weakref.ref[_Cycle]] = []
    alive_at_start: list[bool] = []

    def step(batch_size: int) -> None:
        alive_at_start.append(any(ref() is not None for ref in left_behind))
        cycle = _Cycle(torch.empty(batch_size, 1024))
        left_behind.append(weakref.ref(cycle))
        if batch_size > 5:
            raise torch.OutOfMemoryError("out of memory")

    result = autotune(
        step,
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DEVICE,
        strategy="doubling",
        upload=False,
    )
    assert result.max_batch_size == 5
    # The first step of every trial (a passing trial runs two steps, a failing one stops at one).
    firsts, call = [], 0
    for trial in result.trials:
        firsts.append(call)
        call += 2 if trial.ok else 1
    assert call == len(alive_at_start)
    assert [t.ok for t in result.trials].count(False) >= 2  # several trials follow a failed one
    assert [alive_at_start[i] for i in firsts] == [False] * len(result.trials)


def test_a_fingerprint_that_is_not_the_workloads_is_refused() -> None:
    with pytest.raises(SpecError, match="wrong key"):
        autotune(
            memory_limited_step(3, []), fingerprint="0" * 64, workload=WORKLOAD, device=DEVICE, upload=False
        )


def test_without_cuda_a_device_is_required() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SpecError, match="device="):
        autotune(
            memory_limited_step(3, []), fingerprint=WORKLOAD.fingerprint(), workload=WORKLOAD, upload=False
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="only a GPU run is uploaded")
def test_result_is_uploaded_and_the_workload_found_by_fingerprint(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNER_API_TOKEN", service.token)  # the upload is a write
    seed_probes(service.engine, WORKLOAD, device=DEVICE)  # measured before: the plan is derived at once
    with TunerClient(service.url, token=service.token) as client:
        client.create_plan(
            PlanRequest(workload=WORKLOAD, effective_batch_size=64, device=DEVICE, backend="estimate"),
            progress=False,
        )
        uploaded = autotune(
            memory_limited_step(21, []),
            fingerprint=WORKLOAD.fingerprint(),
            device=DEVICE,
            server=service.url,
        )
        assert uploaded.id is not None and uploaded.workload == WORKLOAD
        stored = client.get_probe(uploaded.id)
    assert stored.max_batch_size == 21 and stored.trials == uploaded.trials
    in_database = repository.get_probe(service.engine, probe_id=int(uploaded.id))
    assert in_database.backend == "cuda" and in_database.extra["source"] == "autotune"


RTX_3090 = DeviceSpec(name="NVIDIA GeForce RTX 3090", total_memory_bytes=25_769_803_776)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_a_named_gpu_is_never_uploaded_as_measured(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNER_API_TOKEN", service.token)
    calls: list[int] = []
    with pytest.raises(SpecError, match="never uploaded") as caught:
        autotune(
            memory_limited_step(32, calls),
            fingerprint=WORKLOAD.fingerprint(),
            workload=WORKLOAD,
            device=RTX_3090,
            server=service.url,
        )
    assert "RTX 3090" in caught.value.message
    assert calls == []  # refused before the search ran the step at all
    stored = repository.find_cached_probe(
        service.engine,
        fingerprint=WORKLOAD.fingerprint(),
        device_name=RTX_3090.name,
        device_memory_bytes=RTX_3090.total_memory_bytes,
        backend="cuda",
        torch_minor=repository.torch_minor(torch.__version__),
        gradient_checkpointing=False,
        alloc_conf=None,
    )
    assert stored is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_a_trial_run_is_labelled_cpu_and_the_server_refuses_it(service: Service) -> None:
    from tuner.errors import PlanError, ServiceError
    from tuner.planner import make_plan

    result = autotune(
        memory_limited_step(32, []),
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=RTX_3090,
        upload=False,
        max_batch_size=64,
    )
    assert result.backend == "cpu" and result.max_batch_size == 32 and result.extra["cuda"] is False
    assert all(t.peak_reserved_bytes is None for t in result.trials)
    with pytest.raises(PlanError, match="on CPU"):
        make_plan(PlanRequest(workload=WORKLOAD, effective_batch_size=64, device=RTX_3090), {False: result})
    with TunerClient(service.url, token=service.token) as client:
        with pytest.raises(ServiceError) as as_cpu:
            client.upload_probe(result)
        # Relabelled cuda, as a CPU run was stored before: refused for its missing peak memory.
        with pytest.raises(ServiceError) as as_cuda:
            client.upload_probe(result.model_copy(update={"backend": "cuda"}))
    assert as_cpu.value.status_code == 422
    assert "no measurement of NVIDIA GeForce RTX 3090" in as_cpu.value.message
    assert as_cuda.value.status_code == 422 and "peak memory" in as_cuda.value.message


def test_without_workload_or_server_it_says_what_is_missing() -> None:
    with pytest.raises(SpecError, match="workload="):
        autotune(memory_limited_step(3, []), fingerprint=WORKLOAD.fingerprint(), device=DEVICE)


def test_tuner_autotune_is_the_contract_function() -> None:
    import tuner
    import tuner.autotuning  # importing the module must not shadow the package's function

    result = tuner.autotune(
        memory_limited_step(4, []),
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DEVICE,
        strategy="doubling",
        upload=False,
    )
    assert result.max_batch_size == 4
