"""Token budgets for variable-length batches: pure arithmetic, no torch.

A loader that fills each micro-batch up to a token budget (fairseq's and Megatron's
`max_tokens`, length-bucketed samplers) pads the micro-batch to its longest row, so what the card
holds is `rows × padded length`: the budget counts those padded tokens.

Why the minimum over probed lengths, and why those lengths. Per rank, a step's peak is about
`F + b × g(L)`: `F` the parameters, gradients and optimizer state (independent of the length),
`g(L)` the bytes per row of length `L`, made of terms linear in `L` (activations, logits) and,
where attention materialises scores, a quadratic one. The largest batch at a length is
`b(L) = floor((C − F) / g(L))` on a capacity `C`. For `g` convex with `g(0) ≥ 0`, `g(L) / L` grows
with `L`, so a budget `T = b(L₀) × L₀` taken at a length `L₀` satisfies `T / L ≤ (C − F) / g(L)`
at every `L ≤ L₀`, hence `floor(T / L) ≤ b(L)`: every shorter micro-batch of at most `T` tokens
fits too. Long rows cost more per token, never less, so the longest length usually sets the
budget. Memory is not assumed linear in tokens: each end of the range is probed, and the middle
length too, where a quadratic term bends furthest from the straight line between the ends (and
where an attention kernel that changes with the length, or the allocator's rounding, would show);
the budget is the smallest `b(L) × L` over all of them, which errs low wherever `g` is not
convex between two probed lengths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tuner.errors import PlanError

LENGTH_ROUNDING = 8
"""The middle length is rounded down to a multiple of this (kernels tile lengths by 8 or more)."""


def lengths_to_probe(min_seq_len: int, seq_len: int) -> list[int]:
    """The lengths a token budget is probed at: both ends of [min_seq_len, seq_len] and the
    middle, where a quadratic memory term bends furthest from the line between the ends."""
    if not 1 <= min_seq_len <= seq_len:
        raise PlanError(f"min_seq_len ({min_seq_len}) must be between 1 and seq_len ({seq_len}).")
    middle = (min_seq_len + seq_len) // 2
    if middle >= LENGTH_ROUNDING:
        middle -= middle % LENGTH_ROUNDING
    return sorted({min_seq_len, max(min_seq_len, middle), seq_len})


@dataclass(frozen=True)
class Budget:
    """The largest padded tokens per micro-batch, and the length that set it."""

    max_tokens: int
    limiting_seq_len: int


def token_budget(max_batch_by_length: Mapping[int, int]) -> Budget:
    """The budget from the largest usable batch at each probed length: the smallest
    `batch × length` (see the module's reasoning). Raises `PlanError` when a length fits nothing."""
    if not max_batch_by_length:
        raise PlanError("A token budget needs at least one probed length.")
    empty = sorted(length for length, batch in max_batch_by_length.items() if batch < 1)
    if empty:
        raise PlanError(
            f"Not even one sequence of {empty[-1]} tokens fits the memory budget, so no token budget "
            "covers the length range."
        )
    tokens, length = min((batch * length, length) for length, batch in max_batch_by_length.items())
    return Budget(max_tokens=tokens, limiting_seq_len=length)


class _TokenTargetError(PlanError, ValueError):
    """An unreachable `effective_tokens`: a `PlanError` for the planner, a `ValueError` for the
    request's validator (which turns it into a 422 naming the field)."""

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TokenAccumulation:
    """How a token-budget loop reaches `effective_tokens` per optimizer step."""

    per_rank_tokens: int
    accumulation_steps: int
    tokens_per_micro_batch: int
    """What each micro-batch should hold (at most the budget) so the steps reach the window."""


def token_accumulation(
    effective_tokens: int, world_size: int, *, max_tokens: int, seq_len: int
) -> TokenAccumulation:
    """The fewest micro-batches of at most `max_tokens` padded tokens that make one rank's share of
    `effective_tokens`, balanced. Raises `PlanError` naming `effective_tokens` when no loop can
    reach it: not a whole number of tokens per rank, or a share smaller than one longest
    sequence (a window must take whole sequences)."""
    per_rank = check_effective_tokens(effective_tokens, world_size, seq_len=seq_len)
    steps = math.ceil(per_rank / max_tokens)
    return TokenAccumulation(
        per_rank_tokens=per_rank,
        accumulation_steps=steps,
        tokens_per_micro_batch=math.ceil(per_rank / steps),
    )


def check_effective_tokens(effective_tokens: int, world_size: int, *, seq_len: int) -> int:
    """One rank's share of `effective_tokens`; `PlanError` (a `ValueError` too, for a validator)
    naming the field where no loop can reach it."""
    if effective_tokens % world_size:
        lower = effective_tokens // world_size * world_size
        raise _TokenTargetError(
            f"effective_tokens ({effective_tokens}) is not divisible by the world size ({world_size}): "
            f"every rank must take the same number of tokens; use {lower or world_size} or "
            f"{lower + world_size}."
        )
    per_rank = effective_tokens // world_size
    if per_rank < seq_len:
        raise _TokenTargetError(
            f"effective_tokens ({effective_tokens}) is not reachable: each of {world_size} rank(s) would "
            f"take {per_rank} tokens per optimizer step, fewer than one sequence of seq_len ({seq_len}); "
            f"use at least {seq_len * world_size}."
        )
    return per_rank


def describe_accumulation(accumulation: TokenAccumulation, max_tokens: int) -> str:
    """The hint a plan gives for reaching `effective_tokens` with `GradientAccumulator`."""
    return (
        "Token budget: fill each micro-batch with whole sequences up to "
        f"{accumulation.tokens_per_micro_batch} padded tokens (rows × longest row; at most {max_tokens}) "
        f"and take {accumulation.accumulation_steps} micro-batch(es) per optimizer step, "
        f"{accumulation.per_rank_tokens} tokens per rank. Micro-batches then differ in tokens: pass "
        "each one's summed loss and its token count to "
        "tuner.training.GradientAccumulator.backward(loss_sum, num_items), which divides by the window's "
        "total, so every token weighs the same."
    )
