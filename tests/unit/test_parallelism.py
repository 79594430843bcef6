"""The plan request's `parallelism` (tuner/parallelism.py): defaults, validation naming the
field, the probe key, and the planner's per-rank arithmetic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tuner.cli import app
from tuner.errors import NothingFitsError, SpecError
from tuner.intake import refuse_what_cannot_fit
from tuner.parallelism import (
    ParallelismSpec,
    ParallelSetup,
    parse_parallelism_text,
)
from tuner.planner import make_plan
from tuner.results import ProbeResult
from tuner.search_types import MemoryLine, Trial
from tuner.spec import DeviceSpec, PlanRequest, parse_plan_request

GIB = 1 << 30
DECODER = {
    "model": {"family": "builtin", "name": "decoder", "kwargs": {"hidden_size": 64, "num_layers": 2}},
    "inputs": {"kind": "tokens", "seq_len": 32},
}
RESNET = {"model": {"family": "torchvision", "name": "resnet18"}, "inputs": {"kind": "image"}}
runner = CliRunner()


def request(workload: dict[str, Any] = DECODER, **fields: Any) -> PlanRequest:
    return parse_plan_request({"workload": workload, "effective_batch_size": 64, **fields})


def test_ddp_is_the_default_above_one_rank_and_none_for_one() -> None:
    assert request().parallelism == ParallelismSpec(strategy="none")
    ddp = request(world_size=8).parallelism
    assert ddp is not None and ddp.strategy == "ddp"
    assert ddp.bucket_cap_mb == 25 and ddp.gradient_as_bucket_view is False  # PyTorch's defaults


def test_a_single_rank_fsdp_is_allowed() -> None:
    chosen = request(parallelism={"strategy": "fsdp"}).parallel_setup()
    assert chosen.parallelism.strategy == "fsdp" and chosen.world_size == 1


@pytest.mark.parametrize(
    ("parallelism", "message"),
    [
        ({"strategy": "zero3"}, "parallelism.strategy: Input should be 'none', 'ddp' or 'fsdp'"),
        ({"strategy": "fsdp", "bucket_cap_mb": 10}, "parallelism.bucket_cap_mb is a ddp option"),
        ({"strategy": "ddp", "param_dtype": "bf16"}, "parallelism.param_dtype is a fsdp option"),
        (
            {"strategy": "ddp", "bucket_cap_mb": 0},
            "parallelism.bucket_cap_mb: Input should be greater than 0",
        ),
        ({"strategy": "fsdp", "param_dtype": "int8"}, "parallelism.param_dtype: Input should be"),
        ({"strategy": "ddp", "sync": True}, "parallelism.sync: Extra inputs are not permitted"),
        ({}, "parallelism.strategy: Field required"),
    ],
)
def test_bad_parallelism_names_the_field(parallelism: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        request(world_size=2, parallelism=parallelism)
    assert message in caught.value.message


def test_fsdp_on_a_family_without_blocks_is_refused() -> None:
    with pytest.raises(SpecError) as caught:
        request(RESNET, world_size=8, parallelism={"strategy": "fsdp"})
    assert "parallelism.strategy: 'fsdp' needs a model of repeated blocks" in caught.value.message
    assert request(RESNET, world_size=8).parallelism == ParallelismSpec(strategy="ddp")


def test_the_probe_key_names_the_world_size_for_fsdp_only() -> None:
    ddp_2 = request(world_size=2).parallel_setup().probe_key
    ddp_64 = request(world_size=64).parallel_setup().probe_key
    assert ddp_2 == ddp_64 == "ddp:bucket_cap_mb=25,gradient_as_bucket_view=false"
    fsdp_8 = request(world_size=8, parallelism={"strategy": "fsdp"}).parallel_setup().probe_key
    fsdp_64 = request(world_size=64, parallelism={"strategy": "fsdp"}).parallel_setup().probe_key
    assert fsdp_8 != fsdp_64 and "world_size=64" in fsdp_64
    assert request().parallel_setup().probe_key == ""
    for key in (ddp_2, fsdp_8, ""):
        assert ParallelSetup.from_key(key).probe_key == key


def test_equal_jobs_compare_alike_whatever_was_spelled_out() -> None:
    implied = request(world_size=4)
    explicit = request(world_size=4, parallelism={"strategy": "ddp", "bucket_cap_mb": 25.0})
    assert implied.model_dump(mode="json") == explicit.model_dump(mode="json")
    # What is dumped validates again (the other strategy's options are left out).
    dumped = explicit.model_dump(mode="json")["parallelism"]
    assert dumped == {"strategy": "ddp", "gradient_as_bucket_view": False, "bucket_cap_mb": 25.0}
    assert ParallelismSpec.model_validate(dumped) == explicit.parallelism


def test_the_option_text() -> None:
    assert parse_parallelism_text("fsdp:reshard_after_forward=false,param_dtype=bf16") == {
        "strategy": "fsdp",
        "reshard_after_forward": False,
        "param_dtype": "bf16",
    }
    with pytest.raises(ValueError, match="name=value"):
        parse_parallelism_text("ddp:bucket_cap_mb")


def _probe(max_batch_size: int, parallel: ParallelSetup) -> ProbeResult:
    per_sample, fixed = GIB // 4, 4 * GIB
    return ProbeResult(
        fingerprint="f" * 64,
        workload=request().workload,
        device=DeviceSpec(name="A100", total_memory_bytes=40 * GIB),
        backend="estimate",
        gradient_checkpointing=False,
        max_batch_size=max_batch_size,
        trials=[
            Trial(batch_size=b, ok=True, peak_reserved_bytes=fixed + b * per_sample)
            for b in (1, max_batch_size)
        ],
        memory_line=MemoryLine(fixed_bytes=fixed, per_sample_bytes=per_sample),
        parallelism=parallel.probe_key,
        extra={
            "memory_per_rank": {"parameters": 100, "gradients": 0, "optimizer_state": 200, "activations": 5}
        },
    )


@pytest.mark.parametrize("world_size", [1, 2, 8, 64])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_per_rank_micro_batch_times_world_times_accumulation_is_the_effective_batch(
    world_size: int, strategy: str
) -> None:
    plan_request = parse_plan_request(
        {
            "workload": DECODER,
            "effective_batch_size": 1024,
            "world_size": world_size,
            "policy": {"gradient_checkpointing": "off"},
            "parallelism": {"strategy": strategy},
        }
    )
    plan = make_plan(plan_request, {False: _probe(24, plan_request.parallel_setup())})
    assert plan.micro_batch_size * world_size * plan.accumulation_steps == 1024
    assert plan.micro_batch_size <= 24
    assert plan.parallelism == ParallelismSpec(strategy=strategy)
    assert plan.memory_per_rank == {
        "micro_batch_size": 24,
        "parameters": 100,
        "gradients": 0,
        "optimizer_state": 200,
        "activations": 5,
    }


def test_fsdp_shares_the_model_states_before_refusing_a_card() -> None:
    llama_7b = {
        "model": {
            "family": "transformers",
            "config": {
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "vocab_size": 32000,
            },
        },
        "inputs": {"kind": "tokens", "seq_len": 2048},
    }
    card = {"name": "V100", "total_memory_bytes": 16 * GIB}
    with pytest.raises(NothingFitsError, match="Nothing fits"):
        refuse_what_cannot_fit(
            request(llama_7b, world_size=8, device=card)
        )  # DDP: every rank holds all of them
    refuse_what_cannot_fit(request(llama_7b, world_size=8, device=card, parallelism={"strategy": "fsdp"}))


@pytest.fixture
def spec_file(tmp_path: Path) -> str:
    path = tmp_path / "decoder.json"
    path.write_text(json.dumps(DECODER))
    return str(path)


@pytest.fixture
def resnet_file(tmp_path: Path) -> str:
    path = tmp_path / "resnet.json"
    path.write_text(json.dumps(RESNET))
    return str(path)


@pytest.mark.parametrize("command", ["plan", "probe"])
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parallelism", "zero3"], "--parallelism: strategy: Input should be 'none', 'ddp' or 'fsdp'"),
        (["--parallelism", "fsdp:bucket_cap_mb=5"], "--parallelism: bucket_cap_mb is a ddp option"),
        (["--parallelism", "ddp:bucket_cap_mb"], "--parallelism: option 'bucket_cap_mb' should look like"),
        (["--parallelism", "ddp", "--world-size", "0"], "--world-size must be at least 1"),
    ],
)
def test_cli_errors_name_the_option(spec_file: str, command: str, args: list[str], message: str) -> None:
    extra = ["--effective-batch-size", "64"] if command == "plan" else []
    result = runner.invoke(app, [command, spec_file, *extra, "--device-memory", "1GiB", *args])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


@pytest.mark.parametrize("command", ["plan", "probe"])
def test_cli_refuses_fsdp_for_a_family_without_blocks(resnet_file: str, command: str) -> None:
    extra = ["--effective-batch-size", "64"] if command == "plan" else []
    args = [
        command,
        resnet_file,
        *extra,
        "--device-memory",
        "1GiB",
        "--world-size",
        "8",
        "--parallelism",
        "fsdp",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "'fsdp' needs a model of repeated blocks" in " ".join(result.output.split())
