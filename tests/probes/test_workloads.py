"""Building workloads from specs: every family, devices, precisions, batches, optimizers, and a
clear ModelBuildError for everything that validates but cannot be built."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from probes.builtin_models import build_builtin
from probes.workloads import build_workload
from tests.probes.tiny_specs import FEATURES, IMAGE, MODELS, SEQ, TOKENS, VOCAB, tiny_spec
from tuner.errors import ModelBuildError
from tuner.settings import get_settings
from tuner.spec import TokensInputs, WorkloadSpec, parse_workload

HAS_BATCHNORM = {"cnn", "python"}
HAS_MOE = {"decoder-moe", "mixtral"}


@pytest.mark.parametrize("label", sorted(MODELS))
def test_every_family_builds_in_training_mode_with_its_facts(label: str) -> None:
    workload = build_workload(tiny_spec(label))
    parameters = list(workload.model.parameters())
    assert workload.model.training
    assert workload.device == torch.device("cpu")
    assert workload.gradient_checkpointing is False
    assert workload.facts.parameter_count == sum(p.numel() for p in parameters) > 0
    assert workload.facts.trainable_parameter_count == workload.facts.parameter_count
    assert workload.facts.has_batchnorm == (label in HAS_BATCHNORM)
    assert workload.facts.has_moe == (label in HAS_MOE)


def test_tied_embeddings_are_counted_once() -> None:
    tied = build_workload(tiny_spec("decoder")).facts.parameter_count
    kwargs = {**MODELS["decoder"][0]["kwargs"], "tie_embeddings": False}
    untied_spec = parse_workload({"model": {**MODELS["decoder"][0], "kwargs": kwargs}, "inputs": TOKENS})
    untied = build_workload(untied_spec).facts.parameter_count
    assert untied - tied == VOCAB * 32


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_cnn_without_batchnorm_reports_none(norm: str) -> None:
    model, inputs = MODELS["cnn"]
    spec = parse_workload({"model": {**model, "kwargs": {**model["kwargs"], "norm": norm}}, "inputs": inputs})
    assert build_workload(spec).facts.has_batchnorm is False


@pytest.mark.parametrize("label", ["mlp", "cnn", "decoder-moe", "gpt2", "llama", "mixtral"])
def test_meta_builds_count_parameters_without_memory(label: str) -> None:
    on_meta = build_workload(tiny_spec(label), device="meta")
    assert {p.device.type for p in on_meta.model.parameters()} == {"meta"}
    assert on_meta.facts == build_workload(tiny_spec(label)).facts
    batch = on_meta.make_batch(3)
    assert {t.device.type for t in batch.values()} == {"meta"}


def test_a_large_model_on_meta_is_counted_not_allocated() -> None:
    spec = parse_workload(
        {
            "model": {
                "family": "transformers",
                "config": {
                    "model_type": "llama",
                    "hidden_size": 2048,
                    "intermediate_size": 5632,
                    "num_hidden_layers": 22,
                    "num_attention_heads": 32,
                    "num_key_value_heads": 4,
                    "vocab_size": 32000,
                },
            },
            "inputs": {"kind": "tokens", "seq_len": 2048},
        }
    )
    facts = build_workload(spec, device="meta").facts
    assert 1_090_000_000 < facts.parameter_count < 1_110_000_000  # TinyLlama-1.1B


@pytest.mark.parametrize("label", ["decoder-moe", "gpt2", "cnn", "python"])
def test_bf16_casts_the_weights_and_the_mixed_precisions_keep_fp32(label: str) -> None:
    for precision, expected in [
        ("bf16", torch.bfloat16),
        ("bf16-mixed", torch.float32),
        ("fp16-mixed", torch.float32),
    ]:
        workload = build_workload(tiny_spec(label, precision=precision))
        assert {p.dtype for p in workload.model.parameters()} == {expected}, precision
        assert workload.parameter_dtype == expected


def test_autocast_follows_the_precision() -> None:
    dtypes = {p: build_workload(tiny_spec("mlp", precision=p)).autocast_dtype for p in ("fp32", "bf16")}
    assert dtypes == {"fp32": None, "bf16": None}
    assert build_workload(tiny_spec("mlp", precision="bf16-mixed")).autocast_dtype == torch.bfloat16
    workload = build_workload(tiny_spec("mlp", precision="fp16-mixed"))
    with workload.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.float16


def test_the_same_seed_builds_the_same_model_and_another_seed_does_not() -> None:
    first, second, other = (build_workload(tiny_spec("decoder"), seed=s) for s in (7, 7, 8))
    for (name, a), b in zip(
        first.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not all(
        torch.equal(a, c) for a, c in zip(first.model.parameters(), other.model.parameters(), strict=True)
    )


# ---------------------------------------------------------------------------------- batches


def test_token_batches_are_ids_in_the_vocabulary_with_labels_equal_to_inputs() -> None:
    batch = build_workload(tiny_spec("llama")).make_batch(5)
    assert batch["input_ids"].shape == (5, SEQ) and batch["input_ids"].dtype == torch.int64
    assert int(batch["input_ids"].min()) >= 0 and int(batch["input_ids"].max()) < VOCAB
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_image_and_feature_batches_have_the_inputs_shape_and_class_labels() -> None:
    image = build_workload(tiny_spec("cnn")).make_batch(3)
    assert image["pixel_values"].shape == (3, IMAGE["channels"], IMAGE["height"], IMAGE["width"])
    assert image["labels"].shape == (3,) and int(image["labels"].max()) < IMAGE["num_classes"]
    features = build_workload(tiny_spec("mlp", precision="bf16")).make_batch(4)
    assert features["features"].shape == (4, FEATURES["dim"])
    assert features["features"].dtype == torch.bfloat16  # bf16 weights take bf16 inputs


def test_a_batch_needs_at_least_one_sample() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        build_workload(tiny_spec("mlp")).make_batch(0)


@pytest.mark.parametrize("label", ["mlp", "cnn", "decoder-moe", "gpt2"])
def test_batches_can_be_made_from_fake_tensors(label: str) -> None:
    with FakeTensorMode():
        workload = build_workload(tiny_spec(label))
        batch = workload.make_batch(1024)
        assert all(isinstance(t, FakeTensor) for t in batch.values())
        assert all(isinstance(p, FakeTensor) for p in workload.model.parameters())


def transformers_spec(config: dict[str, Any], task: str) -> WorkloadSpec:
    return parse_workload(
        {"model": {"family": "transformers", "config": config, "task": task}, "inputs": TOKENS}
    )


def test_masked_lm_and_sequence_classification_heads_build_and_score() -> None:
    bert = {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}
    bert |= {"intermediate_size": 64, "vocab_size": VOCAB, "max_position_embeddings": SEQ}
    masked = build_workload(transformers_spec(bert, "masked-lm"))
    assert type(masked.model).__name__ == "BertForMaskedLM"
    # gpt2 has no padding id, which transformers needs for a batch > 1: the builder supplies one.
    gpt2 = {**MODELS["gpt2"][0]["config"], "pad_token_id": None}
    classify = build_workload(transformers_spec(gpt2, "seq-classification"))
    assert classify.make_batch(3)["labels"].shape == (3,)
    for workload in (masked, classify):
        loss = workload.loss(workload.make_batch(3))
        assert loss.dim() == 0 and torch.isfinite(loss)


def test_transformers_models_train_without_a_key_value_cache() -> None:
    workload = build_workload(tiny_spec("llama"))
    assert workload.model.config.use_cache is False
    assert workload.model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------ build errors


def stored_spec(data: dict[str, Any]) -> WorkloadSpec:
    """A spec as read back from storage: validated without the intake checks (which refuse an
    unknown model type or a missing head before any job), so that the builder's own refusal shows."""
    return WorkloadSpec.model_validate(data)


def test_an_unknown_model_type_fails_where_the_model_is_built() -> None:
    spec = stored_spec(
        {"model": {"family": "transformers", "config": {"model_type": "no-such-model"}}, "inputs": TOKENS}
    )
    with pytest.raises(
        ModelBuildError, match=r"model\.config\.model_type 'no-such-model' is not a model type"
    ) as caught:
        build_workload(spec)
    assert caught.value.code == "model_build_failed"
    assert len(str(caught.value)) < 200  # one sentence, not transformers' list of every model type


def test_a_task_the_model_type_lacks_names_the_task() -> None:
    with pytest.raises(
        ModelBuildError, match=r"model\.task 'masked-lm' is not available for model_type 'gpt2'"
    ):
        build_workload(
            stored_spec(
                {
                    "model": {
                        "family": "transformers",
                        "config": MODELS["gpt2"][0]["config"],
                        "task": "masked-lm",
                    },
                    "inputs": TOKENS,
                }
            )
        )


def python_spec(factory: str, **kwargs: Any) -> WorkloadSpec:
    return parse_workload(
        {"model": {"family": "python", "factory": factory, "kwargs": kwargs}, "inputs": FEATURES}
    )


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (
            "tests.probes.factories:raises",
            {},
            r"'tests.probes.factories:raises' raised RuntimeError: this factory",
        ),
        ("tests.probes.factories:not_a_module", {}, r"returned dict, not a torch.nn.Module"),
        ("tests.probes.factories:classifier", {"depth": 3}, r"model\.kwargs do not fit factory .*depth"),
        ("tests.probes.factories:no_such_function", {}, r"has no function 'no_such_function'"),
        ("tests.probes.no_such_module:build", {}, r"cannot import module 'tests.probes.no_such_module'"),
    ],
)
def test_python_factories_that_cannot_build_say_why(
    factory: str, kwargs: dict[str, Any], message: str
) -> None:
    spec = python_spec(factory, **kwargs)
    with pytest.raises(ModelBuildError, match=message):
        build_workload(spec)


def test_the_allowlist_is_checked_again_where_the_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = python_spec("tests.probes.factories:classifier")  # validated where `tests` was allowed
    monkeypatch.delenv("TUNER_ALLOWED_FACTORY_PACKAGES")
    get_settings.cache_clear()
    with pytest.raises(ModelBuildError, match="package 'tests' is not allowed on this worker"):
        build_workload(spec)


def test_a_python_factory_gets_its_kwargs() -> None:
    workload = build_workload(python_spec("tests.probes.factories:classifier", hidden=7))
    assert isinstance(workload.model, nn.Sequential) and workload.model[0].out_features == 7


def test_builtin_kwargs_that_do_not_validate_name_the_field() -> None:
    tokens = TokensInputs(kind="tokens", seq_len=8)
    with pytest.raises(ModelBuildError, match=r"builtin 'decoder': num_layers: Input should be greater"):
        build_builtin("decoder", {"num_layers": 0}, tokens)
    with pytest.raises(ModelBuildError, match=r"rotary positions need an even head size.*= 3"):
        build_builtin("decoder", {"hidden_size": 12, "num_heads": 4, "num_kv_heads": 2}, tokens)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_without_torchvision_is_a_clear_build_error() -> None:
    spec = parse_workload({"model": {"family": "torchvision", "name": "resnet18"}, "inputs": IMAGE})
    with pytest.raises(ModelBuildError, match="needs the torchvision package"):
        build_workload(spec)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_models_build_by_name() -> None:
    spec = parse_workload({"model": {"family": "torchvision", "name": "resnet18"}, "inputs": IMAGE})
    workload = build_workload(spec)
    assert workload.facts.has_batchnorm and workload.model.fc.out_features == IMAGE["num_classes"]
    with pytest.raises(ModelBuildError, match="torchvision cannot build 'no_such_net'"):
        build_workload(
            parse_workload({"model": {"family": "torchvision", "name": "no_such_net"}, "inputs": IMAGE})
        )


# -------------------------------------------------------------------------------- optimizers

IMPLEMENTATION_FLAGS = {
    "foreach": ("foreach", True),
    "fused": ("fused", True),
    "for-loop": ("foreach", False),
}


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATION_FLAGS))
@pytest.mark.parametrize(
    ("name", "expected"),
    [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)],
)
def test_optimizers_are_built_with_the_spec_implementation(
    name: str, expected: type, implementation: str
) -> None:
    workload = build_workload(tiny_spec("mlp", optimizer={"name": name, "implementation": implementation}))
    optimizer = workload.make_optimizer()
    assert type(optimizer) is expected
    flag, value = IMPLEMENTATION_FLAGS[implementation]
    assert optimizer.defaults[flag] is value
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in workload.model.parameters()}
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.9


def test_the_caller_may_override_the_implementation() -> None:
    workload = build_workload(tiny_spec("mlp", optimizer={"name": "adamw", "implementation": "fused"}))
    assert workload.make_optimizer(implementation="foreach").defaults["foreach"] is True


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor is missing")
def test_adafactor_has_foreach_and_for_loop_but_no_fused() -> None:
    for implementation in ("foreach", "for-loop"):
        spec = tiny_spec("mlp", optimizer={"name": "adafactor", "implementation": implementation})
        assert type(build_workload(spec).make_optimizer()).__name__ == "Adafactor"
    fused = build_workload(tiny_spec("mlp", optimizer={"name": "adafactor", "implementation": "fused"}))
    with pytest.raises(ModelBuildError, match="'fused' does not exist for 'adafactor'"):
        fused.make_optimizer()
