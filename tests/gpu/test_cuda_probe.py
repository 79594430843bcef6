"""The cuda backend on a real GPU (skipped without CUDA; run by scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from probes.cuda import CudaTrials, is_out_of_memory, usable_capacity_bytes  # noqa: E402
from probes.probe import run_probe  # noqa: E402
from tuner.spec import parse_workload  # noqa: E402

# A small decoder whose logits dominate: about half a GiB per sample, so an 80 GB card fits
# around a hundred and the search has a real boundary to find in seconds.
DECODER = parse_workload(
    {
        "model": {
            "family": "builtin",
            "name": "decoder",
            "kwargs": {
                "vocab_size": 32000,
                "hidden_size": 256,
                "num_layers": 2,
                "num_heads": 4,
                "max_seq_len": 2048,
            },
        },
        "inputs": {"kind": "tokens", "seq_len": 2048},
        "precision": "bf16-mixed",
    }
)
HUGE_FEATURES = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64, "num_layers": 1}},
        "inputs": {"kind": "features", "dim": 1 << 20},
        "precision": "fp32",
    }
)


def test_a_trial_records_peaks_retries_and_speed() -> None:
    trials = CudaTrials(DECODER, gradient_checkpointing=False)
    try:
        trial = trials(4)
    finally:
        trials.close()
    assert trial.ok and trial.error is None
    assert trial.peak_allocated_bytes is not None and trial.peak_reserved_bytes is not None
    assert 0 < trial.peak_allocated_bytes <= trial.peak_reserved_bytes
    assert trial.num_alloc_retries is not None and trial.num_alloc_retries >= 0
    assert trial.step_seconds is not None and 0 < trial.step_seconds < trial.seconds
    assert trial.samples_per_second is not None and trial.samples_per_second > 0
    assert trial.peak_phase in ("forward", "backward", "optimizer")


def test_out_of_memory_is_a_verdict_and_memory_is_released() -> None:
    trials = CudaTrials(HUGE_FEATURES, gradient_checkpointing=False)
    try:
        failed = trials(1 << 16)  # a 256 GiB input batch
        assert (failed.ok, failed.error) == (False, "out_of_memory")
        assert torch.cuda.memory_allocated() < 1 << 30  # nothing of the failed trial is left
        assert trials(8).ok  # the next trial runs on a clean pool
    finally:
        trials.close()
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("CUDA out of memory"))  # never by message text


def test_prepare_builds_the_model_that_trials_then_use() -> None:
    trials = CudaTrials(DECODER, gradient_checkpointing=False)
    try:
        before = torch.cuda.memory_allocated()
        trials.prepare()
        assert torch.cuda.memory_allocated() > before  # the weights are on the card
        assert trials(2).ok
    finally:
        trials.close()


def test_capacity_is_most_of_the_card() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0.8 * total < usable_capacity_bytes() < total


def test_the_guided_answer_survives_verification() -> None:
    result = run_probe(DECODER, backend="cuda", gradient_checkpointing=False, verify_steps=5, timeout=400)
    assert result.max_batch_size > 0 and result.stop_reason == "exact"
    assert result.verified_steps == 5
    assert result.device.name == torch.cuda.get_device_properties(0).name
    assert {"torch", "cuda", "tuner"} <= set(result.versions)
    assert len(result.trials) <= 8, [(t.batch_size, t.ok) for t in result.trials]
    # The estimator's line was traced while the search child built its model, and reached it.
    assert isinstance(result.extra["prior"], dict), result.extra["prior"]
    assert 0 <= result.extra["prior_wait_seconds"] <= result.extra["prior_seconds"]
    failures = [t.batch_size for t in result.trials if not t.ok]
    assert min(failures) > result.max_batch_size


def test_a_smaller_card_is_emulated_on_this_one_and_says_so() -> None:
    from probes.estimate.device_model import DEFAULT_DEVICE_MODEL
    from tuner.spec import DeviceSpec

    host = torch.cuda.get_device_properties(0)
    small = DeviceSpec(name="Emulated 16 GiB", total_memory_bytes=min(16 << 30, host.total_memory // 2))
    result = run_probe(DECODER, backend="cuda", device=small, gradient_checkpointing=False, timeout=400)
    limit = small.total_memory_bytes - DEFAULT_DEVICE_MODEL.context_overhead_bytes
    assert result.device == small and result.capacity_bytes == limit
    assert host.name in result.extra["emulated_on"] and "Emulated 16 GiB" in result.extra["emulated_on"]
    assert result.max_batch_size > 0
    for trial in result.trials:
        if trial.ok:
            assert trial.peak_reserved_bytes is not None and trial.peak_reserved_bytes <= limit
    # The same workload on the whole card fits more.
    whole = run_probe(DECODER, backend="cuda", gradient_checkpointing=False, timeout=400)
    assert whole.max_batch_size > result.max_batch_size
