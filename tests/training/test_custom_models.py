"""plan_for on a custom-code model (tests/training/custom_models.py, shaped like MiniMind's): built
as its script builds it, locally without settings or PYTHONPATH, from a script without a
`__main__` guard, and through a real server that allows its package (or refuses it clearly)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess, start_api_server, start_worker, stop_process
from tests.training.custom_models import TinyMindConfig, TinyMindForCausalLM, tiny_mind
from tuner import plan_for
from tuner.errors import ServiceError, SpecError
from tuner.integration import workload_for
from tuner.spec import DeviceSpec

HERE = Path(__file__).resolve().parent
TOKEN = "custom-token"
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 256}
CARD = DeviceSpec(name="Test GPU 3GiB (custom models)", total_memory_bytes=3 * 2**30)


def test_a_custom_model_is_described_by_its_own_class_and_config() -> None:
    spec = workload_for(tiny_mind(use_moe=True, **SMALL), inputs=64)
    assert spec.model.family == "python"
    assert spec.model.factory == "tests.training.custom_models:TinyMindForCausalLM"
    # Only what differs from the config class's defaults, as the user wrote it.
    assert spec.model.kwargs == {"config": {"max_position_embeddings": 256, "use_moe": True}}
    assert spec.describe() == "tests.training.custom_models:TinyMindForCausalLM"
    same = TinyMindForCausalLM(TinyMindConfig(use_moe=True, max_position_embeddings=256))
    assert workload_for(same, inputs=64).fingerprint() == spec.fingerprint()
    assert "TUNER_ALLOWED_FACTORY_PACKAGES" not in os.environ  # trusted for the parse only


def test_the_model_is_built_again_as_the_script_built_it() -> None:
    from probes.workloads import build_workload
    from tuner.custom_code import trusting_factory

    original = tiny_mind(use_moe=True, **SMALL)
    spec = workload_for(original, inputs=64, precision="fp32")
    with trusting_factory("tests"):
        built = build_workload(spec)
    assert type(built.model) is TinyMindForCausalLM
    assert built.model.config.to_dict() == original.config.to_dict()
    assert built.facts.parameter_count == sum(p.numel() for p in original.parameters())
    assert built.facts.has_moe


def test_without_inputs_a_custom_model_asks_for_the_length() -> None:
    with pytest.raises(SpecError, match=r"inputs=SEQ_LEN.*up to 32768 positions"):
        workload_for(tiny_mind())


def test_a_model_class_of_the_running_script_is_refused_with_the_fix() -> None:
    in_main = type("ScriptModel", (TinyMindForCausalLM,), {"__module__": "__main__"})
    with pytest.raises(SpecError, match="move the model's classes into a module"):
        workload_for(in_main(TinyMindConfig(**SMALL)), inputs=64)


@pytest.mark.slow
def test_a_transformers_model_planned_at_its_maximum_length_says_so() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=128))
    plan = plan_for(
        model, effective_batch_size=8, device=CARD, local=True, policy={"gradient_checkpointing": "off"}
    )
    assert any("Planned for 64 tokens per sample, the config's maximum positions" in h for h in plan.hints)


@pytest.mark.slow
def test_plan_for_a_custom_moe_model_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_SERVER", raising=False)
    monkeypatch.delenv("TUNER_ALLOWED_FACTORY_PACKAGES", raising=False)
    plan = plan_for(tiny_mind(use_moe=True, **SMALL), effective_batch_size=64, device=CARD, inputs=64)
    # auto: both choices probed; checkpointing on is the model's blocks (it refuses the HF switch).
    assert set(plan.max_micro_batch_size) == {"off", "on"}
    assert plan.max_micro_batch_size["on"] > plan.max_micro_batch_size["off"] > 0
    assert plan.micro_batch_size * plan.accumulation_steps == 64
    stated = " ".join(plan.hints)
    assert "MoE routing at" in stated and "balanced" in stated and "custom_models.py:" in stated
    assert "taken as true" in stated  # the rotary table's check
    assert "TUNER_ALLOWED_FACTORY_PACKAGES" not in os.environ


SCRIPT = """
import json, os, sys
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))  # as MiniMind's trainer does
from mind.custom_models import tiny_mind
from tuner import plan_for
from tuner.spec import DeviceSpec

print("script top level ran", flush=True)
model = tiny_mind(hidden_size=64, num_hidden_layers=2, vocab_size=256, max_position_embeddings=256)
plan = plan_for(model, effective_batch_size=32, inputs=64, local=True,
                device=DeviceSpec(name="Test GPU 3GiB (script)", total_memory_bytes=3 * 2**30),
                policy={"gradient_checkpointing": "off"})
print("PLAN " + json.dumps({"micro": plan.micro_batch_size, "steps": plan.accumulation_steps,
                            "factory": plan.workload.model.factory}))
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_and_its_own_import_path(tmp_path: Path) -> None:
    package = tmp_path / "lib" / "mind"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(HERE / "custom_models.py", package / "custom_models.py")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TUNER_SERVER")}
    env.pop("TUNER_ALLOWED_FACTORY_PACKAGES", None)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The probe children imported the model from the script's sys.path and never re-ran the script.
    assert done.stdout.count("script top level ran") == 1
    [line] = [line for line in done.stdout.splitlines() if line.startswith("PLAN ")]
    plan = json.loads(line.removeprefix("PLAN "))
    assert plan["factory"] == "mind.custom_models:TinyMindForCausalLM"
    assert plan["micro"] * plan["steps"] == 32


# -- through a server --------------------------------------------------------------------------


def _service(directory: Path, allowed: str) -> tuple[ServerProcess, subprocess.Popen[bytes]]:
    database_url = f"sqlite:///{directory / 'tuner.db'}"
    env = {"TUNER_ALLOWED_FACTORY_PACKAGES": allowed, "TUNER_WORKER_POLL_SECONDS": "0.1"}
    server = start_api_server(database_url, directory, token=TOKEN, env=env)
    worker = start_worker(database_url, directory / "worker.log", env=env)
    return server, worker


@pytest.fixture(scope="module")
def allowing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server, worker = _service(tmp_path_factory.mktemp("custom-allowed"), "tests")
    try:
        yield server
    finally:
        stop_process(worker, timeout=30)
        server.stop()


@pytest.mark.slow
def test_plan_for_a_custom_model_through_a_server_that_allows_it(
    allowing_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNER_ALLOWED_FACTORY_PACKAGES", raising=False)  # the client needs nothing
    plan = plan_for(
        tiny_mind(use_moe=True, **SMALL),
        effective_batch_size=64,
        device=CARD,
        inputs=64,
        server=allowing_server.base_url,
        token=TOKEN,
        wait=120,
        policy={"gradient_checkpointing": "off"},
    )
    assert plan.id is not None and plan.workload.model.family == "python"
    assert plan.micro_batch_size * plan.accumulation_steps == 64
    assert any("MoE routing at" in h for h in plan.hints)


def test_a_server_that_does_not_allow_the_package_says_which_setting(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'tuner.db'}"
    server = start_api_server(database_url, tmp_path, token=TOKEN)
    try:
        with pytest.raises(ServiceError) as caught:
            plan_for(
                tiny_mind(**SMALL),
                effective_batch_size=8,
                device=CARD,
                inputs=64,
                server=server.base_url,
                token=TOKEN,
                wait=0,
            )
    finally:
        server.stop()
    assert caught.value.status_code == 422
    assert "'tests'" in caught.value.message and "not allowed" in caught.value.message
    assert "TUNER_ALLOWED_FACTORY_PACKAGES" in caught.value.message
