"""GradientAccumulator: the window's update equals the big batch's, exactly (docs/training.md)."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.training.tiny_lm import (
    big_batch_update,
    make_model,
    max_abs_difference,
    padded_batch,
    summed_loss,
    uneven_micro_batches,
)
from tuner.training import GradientAccumulator

LR = 0.5


def accumulate(model: nn.Module, micro_batches: list[torch.Tensor], **kwargs: object) -> torch.Tensor:
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=LR), **kwargs)  # type: ignore[arg-type]
    for i, tokens in enumerate(micro_batches):
        loss, count = summed_loss(model, tokens)
        accumulator.backward(loss, count, last=i == len(micro_batches) - 1)
    return accumulator.step()


def textbook_update(model: nn.Module, micro_batches: list[torch.Tensor]) -> None:
    """The usual loop: each micro-batch's mean loss divided by the number of micro-batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for tokens in micro_batches:
        loss, count = summed_loss(model, tokens)
        (loss / count / len(micro_batches)).backward()
    optimizer.step()


def test_window_of_uneven_padded_micro_batches_equals_one_big_batch() -> None:
    micro_batches = uneven_micro_batches()
    counts = [summed_loss(make_model(), mb)[1] for mb in micro_batches]
    assert len(set(counts)) == len(counts), f"micro-batches should hold different token counts: {counts}"

    reference = make_model()
    big_batch_update(reference, micro_batches, LR)
    exact = make_model()
    accumulate(exact, micro_batches)
    textbook = make_model()
    textbook_update(textbook, micro_batches)

    moved = max_abs_difference(reference, make_model())
    assert moved > 1e-3, "the update should move the parameters visibly"
    assert max_abs_difference(exact, reference) < 1e-10
    # The textbook loop over-weights tokens of short micro-batches: measurably different.
    assert max_abs_difference(textbook, reference) > 1e-3


def test_counts_given_as_tensors_and_a_partial_window_are_exact() -> None:
    micro_batches = uneven_micro_batches(seed=3)[:3]  # e.g. the last, short window of an epoch
    reference = make_model()
    big_batch_update(reference, micro_batches, LR)

    model = make_model()
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=LR))
    for tokens in micro_batches:
        loss, count = summed_loss(model, tokens)
        accumulator.backward(loss, torch.tensor(count))  # `last` never said: not needed without DDP
    assert accumulator.pending_micro_batches == 3
    accumulator.step()
    assert accumulator.pending_micro_batches == 0
    assert all(p.grad is None for p in model.parameters())
    assert max_abs_difference(model, reference) < 1e-10

    before = copy.deepcopy(model)
    assert float(accumulator.step()) == 0.0  # nothing pending: no-op
    assert max_abs_difference(model, before) == 0.0


def test_returned_norm_is_that_of_the_mean_loss_gradient_and_clipping_applies() -> None:
    micro_batches = uneven_micro_batches()
    reference = make_model()
    width = max(mb.shape[1] for mb in micro_batches)
    tokens = torch.cat([nn.functional.pad(mb, (0, width - mb.shape[1])) for mb in micro_batches])
    loss, count = summed_loss(reference, tokens)
    (loss / count).backward()
    true_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))  # type: ignore[union-attr]

    norm = accumulate(make_model(), micro_batches)
    assert abs(float(norm) - float(true_norm)) < 1e-10

    start, clipped = make_model(), make_model()
    max_norm = float(true_norm) / 4
    norm = accumulate(clipped, micro_batches, max_grad_norm=max_norm)
    assert abs(float(norm) - float(true_norm)) < 1e-10  # the norm before clipping
    step = torch.linalg.vector_norm(
        torch.stack(
            [(a - b).detach().norm() for a, b in zip(clipped.parameters(), start.parameters(), strict=True)]
        )
    )
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert abs(float(step) - LR * max_norm * float(true_norm) / (float(true_norm) + 1e-6)) < 1e-12


def test_moe_aux_loss_is_weighted_by_items_like_the_main_loss() -> None:
    """aux_loss (a per-micro-batch mean) contributes sum_i n_i * aux_i / N to the objective."""
    micro_batches = uneven_micro_batches()
    model = make_model()
    reference = make_model()
    coefficient = 0.3

    def aux_of(m: nn.Module) -> torch.Tensor:  # stands in for a load-balancing loss
        return coefficient * m.head.weight.pow(2).mean()  # type: ignore[union-attr]

    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=LR))
    for tokens in micro_batches:
        loss, count = summed_loss(model, tokens)
        accumulator.backward(loss, count, aux_loss=aux_of(model))
    accumulator.step()

    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    total = sum(summed_loss(reference, mb)[1] for mb in micro_batches)
    objective = sum(
        summed_loss(reference, mb)[0] + summed_loss(reference, mb)[1] * aux_of(reference)
        for mb in micro_batches
    )
    (objective / total).backward()  # type: ignore[operator]
    optimizer.step()
    assert max_abs_difference(model, reference) < 1e-10


def test_window_with_no_items_makes_no_update() -> None:
    generator = torch.Generator().manual_seed(0)
    all_padding = padded_batch([1, 1], 6, generator)  # one real token per row: nothing to predict
    model = make_model()
    before = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    accumulator = GradientAccumulator(model, optimizer)
    loss, count = summed_loss(model, all_padding)
    assert count == 0
    accumulator.backward(loss, count)
    assert float(accumulator.step()) == 0.0
    assert max_abs_difference(model, before) == 0.0
    assert not optimizer.state  # weight decay and moments untouched


# -- fp16: GradScaler ------------------------------------------------------------------------------


def test_scaler_unscales_before_clipping() -> None:
    """With a huge loss scale, clipping scaled gradients would shrink the step by the scale.

    The step must have exactly `lr × max_grad_norm` length in true units; swapping unscale and
    clip gives a step 2**24 times too short, and skipping unscale a step 2**24 times too long.
    """
    micro_batches = uneven_micro_batches()
    start = make_model(dtype=torch.float32)
    model = copy.deepcopy(start)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    accumulator = GradientAccumulator(
        model, torch.optim.SGD(model.parameters(), lr=LR), scaler=scaler, max_grad_norm=0.01
    )
    for tokens in micro_batches:
        loss, count = summed_loss(model, tokens)
        accumulator.backward(loss, count)
    norm = accumulator.step()
    assert 0.01 < float(norm) < 100, f"norm {float(norm)} should be in true units"
    step = torch.linalg.vector_norm(
        torch.stack(
            [(a - b).detach().norm() for a, b in zip(model.parameters(), start.parameters(), strict=True)]
        )
    )
    assert abs(float(step) - LR * 0.01) < 1e-6


def test_scaler_update_matches_the_big_batch_and_overflow_skips_the_step() -> None:
    micro_batches = uneven_micro_batches()
    reference = make_model(dtype=torch.float32)
    big_batch_update(reference, micro_batches, LR)
    model = make_model(dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    accumulate(model, micro_batches, scaler=scaler)
    assert max_abs_difference(model, reference) < 1e-5

    before = copy.deepcopy(model)
    accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=LR), scaler=scaler)
    loss, count = summed_loss(model, micro_batches[0])
    accumulator.backward(loss * float("inf"), count)
    assert not torch.isfinite(accumulator.step())
    assert max_abs_difference(model, before) == 0.0
    assert scaler.get_scale() < 1024.0  # the scaler backed off


# -- DDP on CPU: gloo, two processes ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        micro_batches = uneven_micro_batches()
        mine = micro_batches[rank::world_size]  # rank 0: 3 + 4 target tokens; rank 1: 41 + 20
        calls = {"n": 0}

        # Unannotated on purpose: DDP compares the annotation with the class, and this module
        # uses postponed (string) annotations.
        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            buffer = bucket.buffer().div_(world_size)
            return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])  # type: ignore[union-attr]

        results: dict[str, object] = {}
        reference = make_model()
        big_batch_update(reference, micro_batches, LR)
        for mode in ("context", "plain", "no_last"):
            model = DistributedDataParallel(make_model())
            model.register_comm_hook(None, counting_allreduce)
            accumulator = GradientAccumulator(model, torch.optim.SGD(model.parameters(), lr=LR))
            calls["n"] = 0
            for i, tokens in enumerate(mine):
                last = i == len(mine) - 1
                if mode == "context":  # forward and backward inside: DDP skips the early all-reduce
                    with accumulator.micro_batch(last=last):
                        loss, count = summed_loss(model, tokens)
                        accumulator.backward(loss, count)
                elif mode == "plain":  # forward outside: DDP all-reduces each micro-batch
                    loss, count = summed_loss(model, tokens)
                    accumulator.backward(loss, count, last=last)
                else:  # the loader ran out before a micro-batch was marked last
                    with accumulator.micro_batch():
                        loss, count = summed_loss(model, tokens)
                        accumulator.backward(loss, count)
            results[f"{mode}_hook_calls"] = calls["n"]
            accumulator.step()
            results[f"{mode}_difference"] = max_abs_difference(model.module, reference)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_syncs_once_per_window_and_matches_the_big_batch(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        # One bucket (tiny model): the no_sync micro-batch did not communicate, the last one did.
        assert results["context_hook_calls"] == 1, results
        assert results["context_difference"] < 1e-10, results
        # Forward outside the context: one all-reduce per micro-batch, the update still exact.
        assert results["plain_hook_calls"] == 2, results
        assert results["plain_difference"] < 1e-10, results
        # No micro-batch marked last: nothing all-reduced in backward; step() did it, still exact.
        assert results["no_last_hook_calls"] == 0, results
        assert results["no_last_difference"] < 1e-10, results
