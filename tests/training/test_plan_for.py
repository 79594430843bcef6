"""plan_for: the workload from what a script has, the machine, and the plan from a server or locally."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tests.integration.api.seeding import seed_probes
from tests.training.conftest import Service
from tuner import plan_for
from tuner.errors import DeviceRequiredError, SpecError
from tuner.integration import detect_world_size, workload_for
from tuner.spec import DeviceSpec, parse_workload

A100 = DeviceSpec(name="NVIDIA A100-SXM4-40GB", total_memory_bytes=42_949_672_960)
MLP = parse_workload(
    {
        "model": {"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 64, "num_layers": 2}},
        "inputs": {"kind": "features", "dim": 32},
        "precision": "fp32",
    }
)
TINY_GPT2 = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=128, vocab_size=256)


def test_a_transformers_model_becomes_a_spec_from_its_config() -> None:
    spec = workload_for(GPT2LMHeadModel(TINY_GPT2))
    assert spec.model.family == "transformers" and spec.model.task == "causal-lm"
    assert spec.model.config is not None and spec.model.config["n_embd"] == 32
    assert "transformers_version" not in spec.model.config
    assert spec.inputs.kind == "tokens" and spec.inputs.seq_len == 128  # the config's max positions
    # The same config gives the same fingerprint however the model was made.
    assert (
        spec.fingerprint() == workload_for(GPT2LMHeadModel(GPT2Config(**TINY_GPT2.to_dict()))).fingerprint()
    )

    classifier = workload_for(
        GPT2ForSequenceClassification(TINY_GPT2), inputs=64, optimizer="sgd", precision="fp32"
    )
    assert classifier.model.task == "seq-classification"
    assert (classifier.inputs.seq_len, classifier.optimizer.name, classifier.precision) == (64, "sgd", "fp32")


def test_a_models_spec_fingerprints_like_the_hand_written_one() -> None:
    # LlamaConfig derives num_key_value_heads, head_dim and rope_parameters when they are left
    # out; the spec taken from the model leaves them out too, as a person writing it would.
    sizes = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128}
    from_model = workload_for(LlamaForCausalLM(LlamaConfig(**sizes)), inputs=64, precision="bf16-mixed")
    by_hand = parse_workload(
        {
            "model": {"family": "transformers", "config": {"model_type": "llama", **sizes}},
            "inputs": {"kind": "tokens", "seq_len": 64},
        }
    )
    assert from_model.fingerprint() == by_hand.fingerprint()
    gpt2_by_hand = parse_workload(
        {
            "model": {"family": "transformers", "config": {"model_type": "gpt2", **TINY_GPT2.to_diff_dict()}},
            "inputs": {"kind": "tokens", "seq_len": 128},
        }
    )
    assert workload_for(GPT2LMHeadModel(TINY_GPT2)).fingerprint() == gpt2_by_hand.fingerprint()


def test_a_value_the_class_would_not_derive_is_kept() -> None:
    config = LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    spec = workload_for(LlamaForCausalLM(config), inputs=32)
    assert spec.model.config is not None and spec.model.config["num_key_value_heads"] == 2


def test_bf16_weights_mean_bf16_precision() -> None:
    config = LlamaConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        max_position_embeddings=256,
    )
    spec = workload_for(LlamaForCausalLM(config).to(torch.bfloat16))
    assert spec.precision == "bf16" and spec.inputs.seq_len == 256  # type: ignore[union-attr]


def test_a_seq_len_beyond_the_models_positions_is_refused() -> None:
    with pytest.raises(SpecError, match="maximum positions"):
        workload_for(GPT2LMHeadModel(TINY_GPT2), inputs=4096)


def test_any_model_with_a_factory_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(SpecError, match="factory="):
        workload_for(model)
    with pytest.raises(SpecError, match="inputs="):
        workload_for(model, factory="tests.training.tiny_lm:make_model")
    with pytest.raises(SpecError, match="TUNER_ALLOWED_FACTORY_PACKAGES"):
        workload_for(
            model, factory="tests.training.tiny_lm:make_model", inputs={"kind": "tokens", "seq_len": 12}
        )
    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "tests")
    from tuner.settings import get_settings

    get_settings.cache_clear()
    spec = workload_for(
        model,
        factory="tests.training.tiny_lm:make_model",
        factory_kwargs={"seed": 3},
        inputs={"kind": "tokens", "seq_len": 12},
    )
    assert (spec.model.family, spec.model.factory, spec.model.kwargs) == (
        "python",
        "tests.training.tiny_lm:make_model",
        {"seed": 3},
    )


def test_world_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert detect_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert detect_world_size() == 8
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(SpecError, match="WORLD_SIZE"):
        detect_world_size()


def test_world_size_from_an_initialised_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "8")  # the process group wins
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert detect_world_size() == 1
    finally:
        dist.destroy_process_group()


def test_without_a_gpu_or_a_device_it_asks_for_a_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceRequiredError, match="device=DeviceSpec"):
        plan_for(MLP, effective_batch_size=64)


def test_asks_the_server_named_by_tuner_server(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_SERVER", service.url)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TUNER_API_TOKEN", service.token)  # without it the server refuses the POST
    probe_ids = seed_probes(service.engine, MLP, device=A100)  # measured before: derived at once
    # The seeded probes are of a single process; DDP, the default at two ranks, is another key.
    plan = plan_for(MLP, effective_batch_size=64, device=A100, wait=0, parallelism="none")
    assert plan.world_size == 2 and plan.device == A100 and plan.backend == "estimate"
    assert plan.micro_batch_size * plan.accumulation_steps * 2 == 64
    assert plan.fingerprint == MLP.fingerprint() and plan.id is not None
    assert plan.probe_id in probe_ids.values()


def test_the_token_argument_wins_and_a_server_argument_beats_the_setting(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNER_SERVER", "http://127.0.0.1:9")  # nothing there
    monkeypatch.setenv("TUNER_API_TOKEN", "not-the-token")
    model = GPT2LMHeadModel(TINY_GPT2)
    seed_probes(service.engine, workload_for(model), device=A100)  # measured before: derived at once
    plan = plan_for(
        model,
        effective_batch_size=16,
        world_size=1,
        device=A100,
        server=service.url,
        token=service.token,
        policy={"max_micro_batch_size": 4},
    )
    assert plan.workload.model.family == "transformers" and plan.effective_batch_size == 16
    assert plan.micro_batch_size == 4 and plan.cache_hit


@pytest.mark.slow
def test_without_a_server_it_probes_and_plans_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("probes.probe")
    monkeypatch.delenv("TUNER_SERVER", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = plan_for(
        MLP,
        effective_batch_size=96,
        device=A100,
        policy={"gradient_checkpointing": "off", "max_micro_batch_size": 32},
    )
    assert plan.backend == "estimate" and plan.id is None
    assert (plan.micro_batch_size, plan.accumulation_steps, plan.world_size) == (32, 3, 1)
    # The search stopped at the caller's cap, as `tuner plan` does: no plan may use more.
    assert plan.max_micro_batch_size["off"] == 32
    assert plan.predicted_peak_bytes is not None and 0 < plan.predicted_peak_bytes < A100.total_memory_bytes
    assert os.environ.get("TUNER_SERVER") is None


@pytest.mark.slow
def test_the_cap_bounds_the_train_search_but_not_the_eval_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`max_micro_batch_size` caps the training micro-batch, so the train probe stops there; the eval
    batch is not bound by it (forward only, no gradients: it is usually larger), so its probe
    searches on and the plan's eval micro-batch may exceed the training cap."""
    pytest.importorskip("probes.probe")
    monkeypatch.delenv("TUNER_SERVER", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plan = plan_for(
        MLP,
        effective_batch_size=96,
        device=A100,
        policy={"gradient_checkpointing": "off", "max_micro_batch_size": 32, "eval": True},
    )
    assert plan.max_micro_batch_size["off"] == 32 and plan.micro_batch_size == 32
    assert plan.eval_micro_batch_size is not None and plan.eval_micro_batch_size > 32
