"""MiniMind's pretraining loop (jingyaogong/minimind, trainer/train_pretrain.py) with a plan.

The model is built as MiniMind builds it (its own config class, then the model; here the
MiniMind-shaped one of examples/minimind_model.py), `tuner.plan_for(model, inputs=SEQ_LEN)` plans
for it as written (a custom-code model: no factory, no settings, no PYTHONPATH), and the loop is
MiniMind's with its accumulation replaced by `tuner.training.GradientAccumulator`, which makes
each update exactly that of one big batch of the window (docs/training.md has the diff).

    python examples/minimind_pretrain.py --steps 20                 # a given split, on this machine
    python examples/minimind_pretrain.py --plan --device-memory 24GiB --steps 5   # planned by estimate

Synthetic data stands in for MiniMind's dataset: right-padded token rows of random length,
labels equal to the inputs with padding set to -100 (what its PretrainDataset returns).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # as MiniMind's trainers reach model/

from minimind_model import MiniMindConfig, MiniMindForCausalLM

from tuner.training import GradientAccumulator, count_targets, summed, windows

PAD = 0
Sample = tuple[torch.Tensor, torch.Tensor]


def synthetic_samples(count: int, seq_len: int, vocab: int, seed: int = 0) -> list[Sample]:
    """(input_ids, labels) rows: arithmetic token runs of random length, right-padded."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        length = int(torch.randint(4, seq_len + 1, (1,), generator=generator))
        start, stride = (int(v) for v in torch.randint(1, 7, (2,), generator=generator))
        ids = torch.full((seq_len,), PAD, dtype=torch.long)
        ids[:length] = (start + stride * torch.arange(length)) % (vocab - 1) + 1
        labels = ids.masked_fill(ids == PAD, -100)
        samples.append((ids, labels))
    return samples


def cosine_lr(step: int, total: int, base: float) -> float:
    """MiniMind's schedule: from 1.0 × base down to 0.1 × base over the run."""
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total)))


def ported_window(
    accumulator: GradientAccumulator, model: torch.nn.Module, window: Sequence[Sample]
) -> torch.Tensor:
    """One optimizer update from a window of micro-batches: MiniMind's forward, tuner's accumulation.

    MiniMind divides each micro-batch's mean loss by the accumulation steps, which weighs a token
    of a short micro-batch more than one of a long one; here each micro-batch's loss is summed over
    its targets (`count_targets` knows the model shifts its labels) and the window divided once."""
    for i, (input_ids, labels) in enumerate(window):
        with accumulator.micro_batch(last=i == len(window) - 1):
            res = model(input_ids, labels=labels)
            n = count_targets(labels)  # (labels[..., 1:] != -100).sum(): the model shifts
            accumulator.backward(summed(res.loss, n), n, aux_loss=res.aux_loss)
    return accumulator.step()  # the window's update; a short last window is stepped the same way


def textbook_window(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[Sample], grad_clip: float
) -> None:
    """MiniMind's own accumulation, for comparison: each mean loss divided by the steps."""
    for input_ids, labels in window:
        res = model(input_ids, labels=labels)
        ((res.loss + res.aux_loss) / len(window)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def big_batch_update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, window: Sequence[Sample], grad_clip: float
) -> None:
    """The reference: the whole window as one batch (rows padded to one length)."""
    width = max(ids.shape[-1] for ids, _ in window)
    pad = torch.nn.functional.pad
    ids = torch.cat([pad(i, (0, width - i.shape[-1]), value=PAD) for i, _ in window])
    labels = torch.cat([pad(lab, (0, width - lab.shape[-1]), value=-100) for _, lab in window])
    res = model(ids, labels=labels)
    (res.loss + res.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def collate(rows: list[Sample]) -> Sample:
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def train(
    model: torch.nn.Module,
    samples: list[Sample],
    sizes: Sequence[int],
    *,
    steps: int,
    lr: float,
    grad_clip: float,
) -> Iterator[tuple[int, float, float]]:
    """MiniMind's loop over `samples` in windows of `sizes`: (step, window loss, gradient norm)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    accumulator = GradientAccumulator(model, optimizer, max_grad_norm=grad_clip)
    for step, window in enumerate(windows(samples, sizes, collate=collate), start=1):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        norm = ported_window(accumulator, model, window)
        assert accumulator.last_loss is not None
        yield step, float(accumulator.last_loss), float(norm)
        if step == steps:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-hidden-layers", type=int, default=2)
    parser.add_argument("--use-moe", action="store_true")
    parser.add_argument("--seq-len", type=int, default=32, help="MiniMind's --max_seq_len")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--accumulation-steps", type=int, default=2)
    parser.add_argument("--plan", action="store_true", help="take the split from tuner.plan_for")
    parser.add_argument("--effective-batch-size", type=int, default=8)
    parser.add_argument("--device-name", default="NVIDIA GeForce RTX 3090")
    parser.add_argument("--device-memory", default="24GiB")
    args = parser.parse_args(argv)

    torch.manual_seed(42)
    config = MiniMindConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, vocab_size=256,
        max_position_embeddings=max(256, args.seq_len), use_moe=args.use_moe,
    )  # fmt: skip
    model = MiniMindForCausalLM(config)
    sizes = [args.micro_batch_size] * args.accumulation_steps
    if args.plan:
        import tuner
        from tuner.spec import DeviceSpec
        from tuner.units import parse_size

        device = DeviceSpec(name=args.device_name, total_memory_bytes=parse_size(args.device_memory))
        plan = tuner.plan_for(
            model, effective_batch_size=args.effective_batch_size, inputs=args.seq_len, device=device,
            precision="fp32", local=True, policy={"gradient_checkpointing": "off"},
        )  # fmt: skip
        sizes = plan.micro_batch_sizes or [plan.micro_batch_size] * plan.accumulation_steps
        print(f"plan: micro-batch {plan.micro_batch_size} × {plan.accumulation_steps} accumulation steps")
    print(f"window: micro-batches {sizes}")
    samples = synthetic_samples(args.steps * sum(sizes), args.seq_len, config.vocab_size)
    for step, loss, norm in train(
        model, samples, sizes, steps=args.steps, lr=args.learning_rate, grad_clip=args.grad_clip
    ):
        print(f"step {step} loss {loss:.4f} grad_norm {norm:.3f}")


if __name__ == "__main__":
    main()
