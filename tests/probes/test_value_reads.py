"""Value reads in a fake-tensor trace: the routing assumption, conditions taken as true, masks
taken as full, and numbers refused with the line that reads them; then the whole estimate of a
custom-code MoE model (MiniMind-shaped, tests/training/custom_models.py) against the same step on
real CPU tensors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from probes.child import run_in_child
from probes.estimate.value_reads import ValueReads
from tuner.errors import EstimateError

TOKENS, EXPERTS, TOP_K = 24, 4, 2
FACTORY_ENV = {"TUNER_ALLOWED_FACTORY_PACKAGES": "tests"}


def route(reads: ValueReads) -> dict[str, Any]:
    """MiniMind's routing loop under `reads`: what each expert was given."""
    scores = torch.randn(TOKENS, EXPERTS).softmax(-1)
    weights, chosen = torch.topk(scores, k=TOP_K, dim=-1, sorted=False)
    taken: dict[int, tuple[bool, int, int]] = {}
    for i in range(EXPERTS):
        mask = chosen == i
        if mask.any():
            tokens = mask.any(dim=-1).nonzero().flatten()
            weight = weights[mask].view(-1, 1)
            taken[i] = (True, int(tokens.shape[0]), int(weight.shape[0]))
        else:
            taken[i] = (False, 0, 0)
    return {"taken": taken, "assumptions": reads.assumptions}


def test_balanced_routing_gives_every_expert_its_share() -> None:
    reads = ValueReads("balanced")
    with FakeTensorMode(), reads:
        result = route(reads)
    share = math.ceil(TOKENS * TOP_K / EXPERTS)
    assert result["taken"] == {i: (True, share, share) for i in range(EXPERTS)}
    [assumption] = result["assumptions"]  # one statement for the routing, naming the topk's line
    assert "balanced" in assumption and "test_value_reads.py:" in assumption


def test_hottest_routing_sends_every_token_to_k_experts() -> None:
    reads = ValueReads("hottest")
    with FakeTensorMode(), reads:
        result = route(reads)
    hot = {i: (True, TOKENS, TOKENS) for i in range(TOP_K)}
    cold = {i: (False, 0, 0) for i in range(TOP_K, EXPERTS)}
    assert result["taken"] == {**hot, **cold}
    assert "hottest" in result["assumptions"][0]


def test_the_real_values_route_the_same_number_of_slots() -> None:
    # What the assumption keeps from the real routing: N·k slots in all, at most N per expert.
    result = route(ValueReads())  # mode not entered: real tensors, real routing
    assert sum(count for _, count, _ in result["taken"].values()) == TOKENS * TOP_K
    assert all(count <= TOKENS for _, count, _ in result["taken"].values())


def test_a_condition_is_taken_as_true_and_stated_with_its_line() -> None:
    reads = ValueReads()
    with FakeTensorMode(), reads:
        table = torch.randn(8, 8)
        recomputed = bool(table[0, 0] == 0)
        mask = torch.randn(10) > 0
        picked = torch.randn(10, 3)[mask]
    assert recomputed is True
    assert picked.shape == (10, 3)  # an unknown mask: all of it, the largest the result can be
    assert len(reads.assumptions) == 2
    assert all("tests/probes/test_value_reads.py:" in a for a in reads.assumptions)


def test_constants_keep_their_values() -> None:
    # The fake-tensor mode knows a constant's value (an optimizer's step count): no assumption.
    reads = ValueReads()
    with FakeTensorMode(), reads:
        step = torch.tensor(3.0)
        assert step.item() == 3.0
    assert reads.assumptions == []


def test_a_number_read_names_the_line() -> None:
    reads = ValueReads(name="builtin mlp")
    with pytest.raises(EstimateError) as caught, FakeTensorMode(), reads:
        x = torch.randn(4, 4)
        int(x.argmax())
    assert "builtin mlp workload cannot be estimated without a GPU" in caught.value.message
    assert "test_value_reads.py:" in caught.value.message and "cuda backend" in caught.value.message


def test_the_backward_of_boolean_indexing_traces() -> None:
    reads = ValueReads()
    with FakeTensorMode(), reads:
        weights, chosen = torch.topk(torch.randn(TOKENS, EXPERTS, requires_grad=True), k=TOP_K, dim=-1)
        picked = weights[chosen == 1]
        picked.sum().backward()
    assert picked.shape == (math.ceil(TOKENS * TOP_K / EXPERTS),)


# -- the whole estimate --------------------------------------------------------------------------

MOE_CONFIG = {"use_moe": True, "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256,
              "max_position_embeddings": 256}  # fmt: skip


def _traced_and_real(routing: str, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    from probes.estimate import emulation
    from probes.estimate.trace import trace_step
    from tests.training.custom_models import tiny_mind
    from tuner.integration import workload_for

    emulation.install_cuda_emulation()
    spec = workload_for(tiny_mind(**MOE_CONFIG), inputs=64, precision="fp32")
    spec = spec.model_copy(update={"moe_routing": routing})
    out: dict[str, Any] = {"fingerprint": spec.fingerprint()}
    for size in batch_sizes:
        fake = trace_step(spec, size)
        real = trace_step(spec, size, real_tensors=True) if routing == "balanced" else None
        out[str(size)] = (fake.peak_bytes, None if real is None else real.peak_bytes, fake.assumptions)
    return out


@pytest.fixture(scope="module")
def moe_traces() -> dict[str, dict[str, Any]]:
    return {
        routing: run_in_child(
            _traced_and_real, routing, (4, 8), timeout=600, what=f"{routing} traces", env=FACTORY_ENV
        )
        for routing in ("balanced", "hottest")
    }


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 8])
def test_a_moe_step_with_value_reads_traces_to_the_real_bytes(
    moe_traces: dict[str, dict[str, Any]], batch_size: int
) -> None:
    fake, real, assumptions = moe_traces["balanced"][str(batch_size)]
    # The real run's routing is whatever the random weights give; the slots are the same in all,
    # so only the largest expert's temporaries differ.
    assert real is not None and abs(fake - real) / real < 0.01
    assert any("MoE routing" in a and "balanced" in a for a in assumptions)
    assert any("custom_models.py" in a and "taken as true" in a for a in assumptions)


@pytest.mark.slow
def test_the_hottest_routing_is_its_own_estimate(moe_traces: dict[str, dict[str, Any]]) -> None:
    balanced, hottest = moe_traces["balanced"], moe_traces["hottest"]
    assert balanced["fingerprint"] != hottest["fingerprint"]  # the assumption is part of the key
    for size in ("4", "8"):
        # The same N·k slots in all: the saved activations, and so the traced peak, barely move.
        assert hottest[size][0] != balanced[size][0]
        assert abs(hottest[size][0] - balanced[size][0]) / balanced[size][0] < 0.01
        assert any("hottest" in a for a in hottest[size][2])
