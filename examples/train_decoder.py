"""Train a small MiniMind-style decoder with a plan from tuner.

The model is the builtin `decoder` (pre-norm, rotary positions, grouped-query attention, a
mixture-of-experts feed-forward with a load-balancing auxiliary loss). The data is synthetic:
arithmetic sequences of random length, right-padded, so every micro-batch holds a different
number of real tokens. At start-up the script asks for a plan (a tuner server with `--server` or
`TUNER_SERVER`, or a local estimate with `--local`), then trains with exact gradient
accumulation: the loss is summed over the non-padding tokens of each micro-batch and normalised
by the token count of the whole window (`tuner.training.GradientAccumulator`).

    python examples/train_decoder.py --local
    python examples/train_decoder.py --server http://127.0.0.1:8000
    python examples/train_decoder.py --micro-batch-size 4 --accumulation-steps 2   # no planning

It runs on a CPU in seconds. Each log line is `step N loss L grad_norm G tokens T`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from probes.builtin_models import DecoderOutput
from probes.workloads import build_workload
from tuner import plan_for
from tuner.results import Plan
from tuner.spec import DeviceSpec, WorkloadSpec, parse_workload
from tuner.training import GradientAccumulator
from tuner.units import format_bytes, parse_size

PAD = 0
IGNORE = -100


def workload(seq_len: int) -> WorkloadSpec:
    """A tiny MoE decoder: seconds per step on a CPU."""
    return parse_workload(
        {
            "model": {
                "family": "builtin",
                "name": "decoder",
                "kwargs": {
                    "vocab_size": 64,
                    "hidden_size": 64,
                    "num_layers": 2,
                    "num_heads": 4,
                    "num_kv_heads": 2,
                    "max_seq_len": seq_len,
                    "use_moe": True,
                    "num_experts": 4,
                    "experts_per_token": 2,
                    "aux_loss_coef": 0.01,
                },
            },
            "inputs": {"kind": "tokens", "seq_len": seq_len},
            "precision": "fp32",
            "optimizer": {"name": "adamw"},
        }
    )


def synthetic_batch(size: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Right-padded arithmetic sequences (start, start+d, start+2d, ... mod vocab) of random length."""
    lengths = torch.randint(4, seq_len + 1, (size,), generator=generator)
    starts = torch.randint(0, vocab - 1, (size, 1), generator=generator)
    strides = torch.randint(1, 4, (size, 1), generator=generator)
    positions = torch.arange(seq_len).unsqueeze(0)
    tokens = (starts + strides * positions) % (vocab - 1) + 1  # 1..vocab-1; 0 is padding
    return torch.where(positions < lengths.unsqueeze(1), tokens, torch.full_like(tokens, PAD))


def summed_next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over the real (non-padding) next tokens, and how many there are."""
    targets = F.pad(tokens[:, 1:], (0, 1), value=PAD)
    targets = targets.masked_fill(targets == PAD, IGNORE)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, (targets != IGNORE).sum()


def get_plan(args: argparse.Namespace, spec: WorkloadSpec) -> Plan | None:
    if args.micro_batch_size:
        return None
    device = DeviceSpec(name=args.device_name, total_memory_bytes=parse_size(args.device_memory))
    return plan_for(
        spec,
        effective_batch_size=args.effective_batch_size,
        world_size=1,
        server=args.server,
        local=args.local,
        device=device,
        backend="estimate",  # a CPU run plans for the named GPU by estimate
        policy={"gradient_checkpointing": "off", "max_micro_batch_size": args.max_micro_batch_size},
    )


def micro_batch_sizes(plan: Plan | None, args: argparse.Namespace) -> list[int]:
    if plan is None:
        return [args.micro_batch_size] * args.accumulation_steps
    return plan.micro_batch_sizes or [plan.micro_batch_size] * plan.accumulation_steps


def train(args: argparse.Namespace) -> float:
    spec = workload(args.seq_len)
    started = time.perf_counter()
    plan = get_plan(args, spec)
    sizes = micro_batch_sizes(plan, args)
    if plan is not None:
        peak = format_bytes(plan.predicted_peak_bytes) if plan.predicted_peak_bytes else "unknown"
        print(
            f"plan {plan.id if plan.id is not None else '(local)'}: micro-batch {plan.micro_batch_size} × "
            f"{plan.accumulation_steps} accumulation steps, checkpointing "
            f"{'on' if plan.gradient_checkpointing else 'off'}, predicted peak {peak} on {plan.device.name} "
            f"({plan.backend}, cache hit {plan.cache_hit}) in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    print(f"window: micro-batches {sizes}", flush=True)

    torch.manual_seed(args.seed)
    built = build_workload(spec, gradient_checkpointing=bool(plan and plan.gradient_checkpointing))
    model = built.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    accumulator = GradientAccumulator(model, optimizer, max_grad_norm=1.0)
    vocab = int(spec.model.kwargs["vocab_size"])
    generator = torch.Generator().manual_seed(args.seed)

    last_loss = float("nan")
    for step in range(1, args.steps + 1):
        tokens_seen = 0
        for index, size in enumerate(sizes):
            tokens = synthetic_batch(size, args.seq_len, vocab, generator)
            with accumulator.micro_batch(last=index == len(sizes) - 1):
                output = model(tokens)
                assert isinstance(output, DecoderOutput)
                loss_sum, count = summed_next_token_loss(output.logits, tokens)
                # The MoE load-balancing loss is a per-micro-batch mean: weighted by the token
                # count like the main loss (the accumulator does it).
                accumulator.backward(loss_sum, count, aux_loss=output.aux_loss)
            tokens_seen += int(count)
        grad_norm = accumulator.step()
        assert accumulator.last_loss is not None
        last_loss = float(accumulator.last_loss)
        print(
            f"step {step} loss {last_loss:.4f} grad_norm {float(grad_norm):.4f} tokens {tokens_seen}",
            flush=True,
        )
    return last_loss


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", help="tuner service URL (default: TUNER_SERVER)")
    where.add_argument("--local", action="store_true", help="estimate locally, without a server")
    parser.add_argument("--effective-batch-size", type=int, default=32)
    parser.add_argument(
        "--max-micro-batch-size", type=int, default=8, help="policy cap on the micro-batch (default 8)"
    )
    parser.add_argument("--device-name", default="NVIDIA A100-SXM4-40GB", help="the GPU to plan for")
    parser.add_argument("--device-memory", default="40GiB", help="its memory, e.g. 40GiB")
    parser.add_argument("--micro-batch-size", type=int, help="skip planning: this micro-batch ...")
    parser.add_argument("--accumulation-steps", type=int, default=1, help="... and these steps")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
