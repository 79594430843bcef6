"""The eval step on a real GPU (skipped without CUDA; run by scripts/gpu_check.sh): the training
state stays resident through eval, the eval probe finds a larger batch than the train probe, and
the estimate's eval peak is close to the measured one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from probes.cuda import CudaTrials  # noqa: E402
from probes.eval_step import prepare_training_state, run_eval_steps  # noqa: E402
from probes.probe import run_probe  # noqa: E402
from probes.workloads import build_workload  # noqa: E402
from tuner.search_types import SearchConfig  # noqa: E402
from tuner.spec import DeviceSpec, parse_workload  # noqa: E402

DECODER = {
    "model": {
        "family": "transformers",
        "config": {
            "model_type": "llama",
            "hidden_size": 256,
            "intermediate_size": 704,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 6400,
            "max_position_embeddings": 512,
        },
    },
    "inputs": {"kind": "tokens", "seq_len": 512},
    "precision": "bf16-mixed",
}


def test_the_optimizer_state_stays_resident_through_eval() -> None:
    workload = build_workload(parse_workload(DECODER), device="cuda")
    optimizer = workload.make_optimizer()
    prepare_training_state(workload, optimizer)
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0
    )
    parameter_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    assert all(p.grad is None for p in workload.model.parameters())  # gradients freed
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    assert resident >= parameter_bytes + state_bytes
    run_eval_steps(workload, 8, synchronize=torch.cuda.synchronize)
    assert torch.cuda.max_memory_allocated() > resident
    assert workload.model.training  # back in training mode after eval


def test_cuda_eval_trial_measures_from_the_training_state() -> None:
    trials = CudaTrials(parse_workload(DECODER), gradient_checkpointing=False, step="eval")
    try:
        trial = trials(4)
    finally:
        trials.close()
    assert trial.ok
    assert trial.peak_phase == "forward"


def test_eval_probe_fits_more_than_the_train_probe_on_an_emulated_card() -> None:
    spec = parse_workload(DECODER)
    card = DeviceSpec(name="emulated 4 GiB", total_memory_bytes=4 << 30)
    budget = SearchConfig(max_trials=16)
    train = run_probe(spec, backend="cuda", device=card, gradient_checkpointing=False, search=budget)
    evaluation = run_probe(
        spec, backend="cuda", device=card, gradient_checkpointing=False, search=budget, step="eval"
    )
    assert evaluation.step == "eval"
    assert evaluation.max_batch_size > train.max_batch_size > 0
    estimate = run_probe(
        spec, backend="estimate", device=card, gradient_checkpointing=False, search=budget, step="eval"
    )
    # The estimate errs low, never far: within 15 % of the measured eval batch, not above it by more.
    assert estimate.max_batch_size <= evaluation.max_batch_size * 1.05
    assert estimate.max_batch_size >= evaluation.max_batch_size * 0.85
