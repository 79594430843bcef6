"""examples/minimind_pretrain.py: MiniMind's loop ported to GradientAccumulator makes exactly the
update of one big batch of the window (MiniMind's own `loss / accumulation_steps` does not); the
target count knows the model shifts its labels; a window of nothing but padding is safe; the
script runs as written, with a given split and with a plan."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tuner.training import GradientAccumulator, count_targets, summed

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
SEQ = 12


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import minimind_pretrain

        yield minimind_pretrain
    finally:
        sys.path.remove(str(EXAMPLES))


def tiny_model(example: ModuleType, *, use_moe: bool = False) -> torch.nn.Module:
    from minimind_model import MiniMindConfig, MiniMindForCausalLM

    torch.manual_seed(0)
    config = MiniMindConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
        max_position_embeddings=64, use_moe=use_moe, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return MiniMindForCausalLM(config).double()


def uneven_window(example: ModuleType) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of 3, 1 and 4 rows of different lengths and padding, as a plan's uneven split
    and an epoch's tail give them."""
    samples = example.synthetic_samples(8, SEQ, 64, seed=3)
    rows = [example.collate(samples[:3]), example.collate(samples[3:4]), example.collate(samples[4:])]
    widths = (12, 7, 10)
    return [(ids[:, :width], labels[:, :width]) for (ids, labels), width in zip(rows, widths, strict=True)]


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in pairs)


def test_the_ported_loop_is_one_big_batch_exactly(example: ModuleType) -> None:
    window = uneven_window(example)
    reference, ported, textbook = (tiny_model(example) for _ in range(3))
    lr = 1.0  # SGD with a large step: the parameters move by the gradient itself
    reference_sgd = torch.optim.SGD(reference.parameters(), lr=lr)
    example.big_batch_update(reference, reference_sgd, window, grad_clip=1e9)
    accumulator = GradientAccumulator(ported, torch.optim.SGD(ported.parameters(), lr=lr), max_grad_norm=1e9)
    example.ported_window(accumulator, ported, window)
    example.textbook_window(textbook, torch.optim.SGD(textbook.parameters(), lr=lr), window, grad_clip=1e9)

    moved = max_difference(reference, tiny_model(example))
    assert moved > 1e-3  # the step did change the weights
    assert max_difference(reference, ported) < 1e-12 * max(1.0, moved)
    assert max_difference(reference, textbook) > 1e-3 * moved  # MiniMind's own division is biased


def test_counting_unshifted_labels_gives_the_wrong_gradient(example: ModuleType) -> None:
    window = uneven_window(example)
    reference, miscounted = tiny_model(example), tiny_model(example)
    reference_sgd = torch.optim.SGD(reference.parameters(), lr=1.0)
    example.big_batch_update(reference, reference_sgd, window, grad_clip=1e9)
    accumulator = GradientAccumulator(miscounted, torch.optim.SGD(miscounted.parameters(), lr=1.0))
    for i, (ids, labels) in enumerate(window):
        res = miscounted(ids, labels=labels)
        n = count_targets(labels, shifted=False)  # (labels != -100).sum(): one too many per row
        accumulator.backward(summed(res.loss, n), n, last=i == len(window) - 1)
    accumulator.step()
    assert max_difference(reference, miscounted) > 1e-4
    ids, labels = window[0]
    assert int(count_targets(labels)) == int((labels[:, 1:] != -100).sum())
    assert int(count_targets(labels, shifted=False)) - int(count_targets(labels)) == int(
        (labels[:, 0] != -100).sum()
    )


def test_a_micro_batch_of_nothing_but_padding(example: ModuleType) -> None:
    model = tiny_model(example)
    ids = torch.zeros((2, SEQ), dtype=torch.long)
    labels = torch.full((2, SEQ), -100)
    res = model(ids, labels=labels)
    n = count_targets(labels)
    assert torch.isnan(res.loss) and int(n) == 0
    loss_sum = summed(res.loss, n)
    assert float(loss_sum) == 0.0  # res.loss * 0 would be NaN
    loss_sum.backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_the_moe_variant_trains_with_its_auxiliary_loss(example: ModuleType) -> None:
    model = tiny_model(example, use_moe=True)
    samples = example.synthetic_samples(24, SEQ, 64, seed=1)
    losses = [loss for _, loss, _ in example.train(model, samples, [2, 2], steps=6, lr=5e-3, grad_clip=1.0)]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TUNER_SERVER", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "minimind_pretrain.py"), *args],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def losses_of(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([\d.]+) grad_norm [\d.]+$", stdout, re.M)]


def test_the_script_runs_and_the_loss_falls() -> None:
    run = run_script("--steps", "12")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "window: micro-batches [4, 4]" in run.stdout
    losses = losses_of(run.stdout)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5


@pytest.mark.slow
def test_the_script_plans_the_model_as_minimind_builds_it() -> None:
    run = run_script("--plan", "--effective-batch-size", "16", "--steps", "2", "--device-memory", "3GiB")
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"^plan: micro-batch \d+ × \d+ accumulation steps$", run.stdout, re.M)
    assert len(losses_of(run.stdout)) == 2
