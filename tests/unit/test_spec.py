"""Workload spec validation and the fingerprint (docs/contract.md "Workload spec")."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tuner.errors import SpecError
from tuner.settings import get_settings
from tuner.spec import (
    MAX_LAYERS,
    MAX_SEQ_LEN,
    WorkloadSpec,
    parse_plan_request,
    parse_workload,
)


def gpt2(**config: Any) -> dict[str, Any]:
    return {
        "model": {"family": "transformers", "config": {"model_type": "gpt2", "n_positions": 1024, **config}},
        "inputs": {"kind": "tokens", "seq_len": 128},
    }


def with_changes(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `base` with `a.b.c` set to `value` (or removed where value is `...`)."""
    data = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(last)
    else:
        node[last] = value
    return data


FEATURES = {"kind": "features", "dim": 8}
BUILTIN_MLP = {"model": {"family": "builtin", "name": "mlp"}, "inputs": FEATURES}

# (spec, the field the message must name, a phrase of what was expected)
BAD_SPECS = {
    "unknown family": (with_changes(gpt2(), "model.family", "keras"), "model.family", "transformers"),
    "negative seq_len": (
        with_changes(gpt2(), "inputs.seq_len", -1),
        "inputs.seq_len",
        "greater than or equal",
    ),
    "zero seq_len": (with_changes(gpt2(), "inputs.seq_len", 0), "inputs.seq_len", "greater than or equal"),
    "absurd seq_len": (
        with_changes(gpt2(), "inputs.seq_len", MAX_SEQ_LEN + 1),
        "inputs.seq_len",
        "less than or equal",
    ),
    "absurd layers": (gpt2(n_layer=MAX_LAYERS + 1), "n_layer", "between 1 and"),
    "negative hidden": (gpt2(n_embd=-768), "n_embd", "between 1 and"),
    "absurd vocab": (gpt2(vocab_size=10**9), "vocab_size", "between 1 and"),
    "string for a size": (gpt2(n_layer="twelve"), "n_layer", "integer"),
    "boolean for a size": (with_changes(gpt2(), "inputs.seq_len", True), "seq_len", "number"),
    "text for seq_len": (with_changes(gpt2(), "inputs.seq_len", "long"), "inputs.seq_len", "integer"),
    "fractional seq_len": (with_changes(gpt2(), "inputs.seq_len", 12.5), "inputs.seq_len", "integer"),
    "unknown precision": (with_changes(gpt2(), "precision", "fp8"), "precision", "bf16-mixed"),
    "unknown optimizer": (with_changes(gpt2(), "optimizer.name", "lion"), "optimizer.name", "adamw"),
    "unknown implementation": (
        with_changes(gpt2(), "optimizer.implementation", "magic"),
        "optimizer.implementation",
        "fused",
    ),
    "unknown top-level key": (with_changes(gpt2(), "batch_size", 8), "batch_size", "not permitted"),
    "unknown key in inputs": (with_changes(gpt2(), "inputs.stride", 2), "inputs.stride", "not permitted"),
    "unknown inputs kind": (with_changes(gpt2(), "inputs.kind", "audio"), "inputs", "tokens"),
    "config without model_type": (
        with_changes(gpt2(), "model.config.model_type", ...),
        "model.config",
        "model_type",
    ),
    "transformers without config": (with_changes(gpt2(), "model.config", ...), "model.config", "required"),
    "seq_len past the positions": (gpt2(n_positions=64), "inputs.seq_len", "maximum positions"),
    "inputs of the wrong kind": (
        with_changes(BUILTIN_MLP, "inputs", {"kind": "image"}),
        "inputs.kind",
        "'features'",
    ),
    "unknown builtin": (with_changes(BUILTIN_MLP, "model.name", "transformer"), "model.name", "decoder"),
    "builtin kwarg out of range": (
        with_changes(BUILTIN_MLP, "model.kwargs", {"hidden_dim": 0}),
        "hidden_dim",
        "greater than or equal",
    ),
    "unknown builtin kwarg": (
        with_changes(BUILTIN_MLP, "model.kwargs", {"width": 3}),
        "width",
        "not permitted",
    ),
    "builtin kwarg of the wrong type": (
        with_changes(BUILTIN_MLP, "model.kwargs", {"num_layers": True}),
        "num_layers",
        "number",
    ),
    "decoder heads that do not divide": (
        {
            "model": {"family": "builtin", "name": "decoder", "kwargs": {"hidden_size": 30, "num_heads": 4}},
            "inputs": {"kind": "tokens", "seq_len": 8},
        },
        "hidden_size",
        "divisible",
    ),
    "python factory that is not module:function": (
        {"model": {"family": "python", "factory": "not a path"}, "inputs": {"kind": "features", "dim": 8}},
        "model.factory",
        "package.module:function",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_spec_gives_one_clear_error_naming_the_field(case: str) -> None:
    data, field, expected = BAD_SPECS[case]
    with pytest.raises(SpecError) as caught:
        parse_workload(data)
    message = str(caught.value)
    assert caught.value.code == "invalid_spec"
    assert field in message, message
    assert expected in message, message
    with pytest.raises(ValidationError) as raw:
        WorkloadSpec.model_validate(data)
    assert len(raw.value.errors()) == 1, f"more than one error for one mistake: {message}"


def test_a_spec_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(SpecError, match="valid dictionary"):
        parse_workload(["gpt2"])


def test_every_bad_field_is_named_when_there_are_several() -> None:
    data = with_changes(with_changes(gpt2(), "inputs.seq_len", -1), "precision", "fp8")
    with pytest.raises(SpecError) as caught:
        parse_workload(data)
    assert "inputs.seq_len" in str(caught.value) and "precision" in str(caught.value)


def test_a_python_factory_outside_the_allowlist_is_refused_at_intake_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = {"model": {"family": "python", "factory": "os.path:join"}, "inputs": FEATURES}
    monkeypatch.delenv("TUNER_ALLOWED_FACTORY_PACKAGES", raising=False)
    with pytest.raises(SpecError) as caught:
        parse_workload(data)
    message = str(caught.value)
    assert caught.value.code == "invalid_spec"
    assert "model.factory" in message and "TUNER_ALLOWED_FACTORY_PACKAGES" in message, message
    with pytest.raises(SpecError, match=r"workload\.model\.factory: package 'os' is not allowed"):
        parse_plan_request({"workload": data, "effective_batch_size": 8})
    # The allowlist is the taking-in process's own: passed in, it is not read from the environment.
    assert parse_workload(data, allowed_factory_packages={"os"}).model.factory == "os.path:join"
    # A spec read back (a stored row, a job's payload) validates whatever this process allows.
    assert WorkloadSpec.model_validate(data).model.factory == "os.path:join"


def test_an_allowed_python_factory_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "mypkg, tests")
    spec = parse_workload(
        {"model": {"family": "python", "factory": "tests.probes.factories:classifier"}, "inputs": FEATURES}
    )
    assert spec.model.factory == "tests.probes.factories:classifier"


def test_the_allowlist_is_by_top_level_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "tests")
    with pytest.raises(SpecError, match="'testsuite' is not allowed"):
        parse_workload(
            {"model": {"family": "python", "factory": "testsuite.models:build"}, "inputs": FEATURES}
        )


def test_an_unknown_model_type_is_refused_naming_the_nearest_known_one() -> None:
    with pytest.raises(SpecError, match=r"model_type 'gpt-2' is not a model type .*did you mean 'gpt2'\?"):
        parse_workload(gpt2() | {"model": {"family": "transformers", "config": {"model_type": "gpt-2"}}})


def test_a_config_key_the_model_type_does_not_know_is_refused_naming_the_nearest_key() -> None:
    # transformers would set `n_layers` as a stray attribute and build GPT-2's 12-layer default.
    with pytest.raises(SpecError) as caught:
        parse_workload(gpt2(n_layers=48))
    assert (
        "model.config: 'n_layers' is not a key of 'gpt2' configs; did you mean 'n_layer'?"
        in caught.value.message
    )
    with pytest.raises(SpecError, match=r"'my_extra_setting' and 'n_layers' are not keys"):
        parse_plan_request({"workload": gpt2(my_extra_setting="x", n_layers=4), "effective_batch_size": 8})


def test_a_task_the_model_type_has_no_head_for_is_refused() -> None:
    with pytest.raises(SpecError, match=r"model\.task: 'gpt2' has no masked-lm head .*causal-lm"):
        parse_workload(
            gpt2()
            | {"model": {"family": "transformers", "config": {"model_type": "gpt2"}, "task": "masked-lm"}}
        )


def test_keys_every_config_accepts_stay_accepted() -> None:
    spec = parse_workload(
        gpt2(
            vocab_size=1000,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=0,
            embd_pdrop=0.0,
            torch_dtype="float32",
            architectures=["GPT2LMHeadModel"],
            max_position_embeddings=1024,
            num_hidden_layers=2,
        )
    )
    assert spec.model.config is not None and spec.model.config["n_layer"] == 2


def test_a_stored_spec_with_a_key_refused_now_stays_readable() -> None:
    # Rows are read back without the intake checks: what was accepted once is never unreadable.
    stored = WorkloadSpec.model_validate(gpt2(my_extra_setting="x"))
    assert stored.model.config is not None and stored.model.config["my_extra_setting"] == "x"


def test_validating_a_spec_does_not_import_torch() -> None:
    code = (
        "import sys, tuner.spec\n"
        "tuner.spec.parse_workload({'model': {'family': 'builtin', 'name': 'decoder'},"
        " 'inputs': {'kind': 'tokens', 'seq_len': 64}})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_plan_request_fields_are_named() -> None:
    request = {
        "workload": BUILTIN_MLP,
        "effective_batch_size": 0,
        "device": {"name": "x", "total_memory_bytes": -1},
    }
    with pytest.raises(SpecError) as caught:
        parse_plan_request(request)
    assert "effective_batch_size" in str(caught.value)
    assert "device.total_memory_bytes" in str(caught.value)


# ------------------------------------------------------------------------------- fingerprint


def shuffled(value: Any, rng: random.Random) -> Any:
    """`value` with the keys of every dict, at every depth, in a random order."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {key: shuffled(value[key], rng) for key in keys}
    return value


LLAMA = {
    "model": {
        "family": "transformers",
        "config": {
            "model_type": "llama",
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "task": "causal-lm",
    },
    "inputs": {"kind": "tokens", "seq_len": 64},
    "precision": "bf16-mixed",
    "optimizer": {"name": "adamw", "implementation": "fused"},
}


@settings(max_examples=30, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_the_fingerprint_does_not_depend_on_key_order(rng: random.Random) -> None:
    reordered = shuffled(LLAMA, rng)
    assert parse_workload(reordered).fingerprint() == parse_workload(LLAMA).fingerprint()


EXPLICIT_AND_IMPLIED = {
    "builtin kwargs": (
        {"model": {"family": "builtin", "name": "decoder"}, "inputs": {"kind": "tokens", "seq_len": 64}},
        {
            "model": {
                "family": "builtin",
                "name": "decoder",
                "kwargs": {"hidden_size": 512, "num_layers": 8, "positions": "rope", "use_moe": False},
            },
            "inputs": {"kind": "tokens", "seq_len": 64},
        },
    ),
    "precision and optimizer": (
        BUILTIN_MLP,
        BUILTIN_MLP
        | {"precision": "bf16-mixed", "optimizer": {"name": "adamw", "implementation": "foreach"}},
    ),
    "image inputs": (
        {"model": {"family": "builtin", "name": "cnn"}, "inputs": {"kind": "image"}},
        {
            "model": {"family": "builtin", "name": "cnn", "kwargs": {"norm": "batch"}},
            "inputs": {"kind": "image", "channels": 3, "height": 224, "width": 224, "num_classes": 1000},
        },
    ),
    "transformers task": (gpt2(), with_changes(gpt2(), "model.task", "causal-lm")),
    "transformers bookkeeping keys": (gpt2(), gpt2(transformers_version="4.57.0", _name_or_path="gpt2")),
    "transformers config defaults": (
        gpt2(),
        gpt2(
            n_layer=12, n_embd=768, vocab_size=50257, activation_function="gelu_new", tie_word_embeddings=True
        ),
    ),
    "transformers alias names": (gpt2(n_layer=4, n_head=4), gpt2(num_hidden_layers=4, num_attention_heads=4)),
    "llama config defaults": (
        LLAMA,
        with_changes(
            with_changes(LLAMA, "model.config.intermediate_size", 11008), "model.config.rms_norm_eps", 1e-6
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(EXPLICIT_AND_IMPLIED))
def test_explicit_defaults_fingerprint_like_implied_ones(case: str) -> None:
    implied, explicit = EXPLICIT_AND_IMPLIED[case]
    assert parse_workload(implied).fingerprint() == parse_workload(explicit).fingerprint()


BUILD_RELEVANT_CHANGES = {
    "precision": ("precision", "fp32"),
    "optimizer": ("optimizer.name", "sgd"),
    "implementation": ("optimizer.implementation", "foreach"),
    "seq_len": ("inputs.seq_len", 128),
    "layers": ("model.config.num_hidden_layers", 3),
    "a passed-through config key": ("model.config.rope_theta", 500000.0),
    "task": ("model.task", "seq-classification"),
    "model_type": ("model.config.model_type", "mistral"),
}


def test_every_build_relevant_field_changes_the_fingerprint() -> None:
    prints = {"original": parse_workload(LLAMA).fingerprint()}
    for name, (path, value) in BUILD_RELEVANT_CHANGES.items():
        prints[name] = parse_workload(with_changes(LLAMA, path, value)).fingerprint()
    assert len(set(prints.values())) == len(prints), prints


def test_builtin_kwargs_and_names_change_the_fingerprint() -> None:
    base = {"model": {"family": "builtin", "name": "decoder"}, "inputs": {"kind": "tokens", "seq_len": 64}}
    variants = [
        base,
        with_changes(base, "model.kwargs", {"use_moe": True}),
        with_changes(base, "model.kwargs", {"positions": "learned"}),
        with_changes(base, "model.kwargs", {"num_kv_heads": None}),
        with_changes(base, "model.kwargs", {"use_moe": True, "moe_capacity_factor": 2.0}),
    ]
    assert len({parse_workload(v).fingerprint() for v in variants}) == len(variants)


def test_inputs_and_factory_fields_change_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's shape and a python factory's reference and kwargs build a different workload."""
    monkeypatch.setenv("TUNER_ALLOWED_FACTORY_PACKAGES", "mypkg")
    get_settings.cache_clear()
    try:
        image = {"model": {"family": "builtin", "name": "cnn"}, "inputs": {"kind": "image"}}
        factory = {"model": {"family": "python", "factory": "mypkg.models:build"}, "inputs": FEATURES}
        variants = [
            BUILTIN_MLP,
            with_changes(BUILTIN_MLP, "inputs.dim", 16),
            with_changes(BUILTIN_MLP, "inputs.num_classes", 3),
            image,
            with_changes(image, "inputs.height", 112),
            with_changes(image, "inputs.channels", 1),
            factory,
            with_changes(factory, "model.factory", "mypkg.models:build_other"),
            with_changes(factory, "model.kwargs", {"width": 2}),
        ]
        prints = [parse_workload(v).fingerprint() for v in variants]
    finally:
        get_settings.cache_clear()
    assert len(set(prints)) == len(variants)


def test_the_canonical_json_has_the_defaults_filled_in() -> None:
    canonical = json.loads(parse_workload(BUILTIN_MLP).canonical_json())
    assert canonical["precision"] == "bf16-mixed"
    assert canonical["optimizer"] == {"name": "adamw", "implementation": "foreach"}
    assert canonical["model"]["kwargs"] == {"hidden_dim": 1024, "num_layers": 4, "dropout": 0.0}
    assert canonical["inputs"] == {"kind": "features", "dim": 8, "num_classes": 10}
    assert len(parse_workload(BUILTIN_MLP).fingerprint()) == 64


MLP_REQUEST: dict[str, Any] = {
    "workload": {"model": {"family": "builtin", "name": "mlp"}, "inputs": {"kind": "features", "dim": 4}},
    "effective_batch_size": 8,
    "backend": "estimate",
    "device": {"name": "Test GPU", "total_memory_bytes": 2**30},
}


@pytest.mark.parametrize(
    ("where", "request_data"),
    [
        ("device.name", {"device": {"name": "H100\x00", "total_memory_bytes": 2**34}}),
        (
            "workload.model.config.n\x00ame",
            {
                "workload": {
                    "model": {"family": "transformers", "config": {"model_type": "gpt2", "n\x00ame": 1}},
                    "inputs": {"kind": "tokens", "seq_len": 8},
                }
            },
        ),
    ],
)
def test_nul_characters_are_refused_anywhere(where: str, request_data: dict[str, Any]) -> None:
    """PostgreSQL text cannot hold NUL; a request carrying one is the client's error, not a 500."""
    with pytest.raises(SpecError, match="must not contain NUL characters") as caught:
        parse_plan_request({**MLP_REQUEST, **request_data})
    assert where.split(".")[0] in caught.value.message


def test_the_loop_shape_is_part_of_the_workload_and_its_fingerprint() -> None:
    base = {"model": {"family": "builtin", "name": "mlp"}, "inputs": {"kind": "features", "dim": 8}}
    default = parse_workload(base)
    keeps = parse_workload({**base, "loop": {"keeps_outputs": True}})
    releases = parse_workload({**base, "loop": {"keeps_outputs": False}})
    assert default.loop.keeps_outputs is True and '"loop":{"keeps_outputs":true}' in default.canonical_json()
    assert default.fingerprint() == keeps.fingerprint() != releases.fingerprint()
    with pytest.raises(SpecError, match=r"loop\.keeps_outputs"):
        parse_workload({**base, "loop": {"keeps_outputs": "sometimes"}})
    with pytest.raises(SpecError, match=r"loop\.keeps_logits"):
        parse_workload({**base, "loop": {"keeps_logits": True}})


def test_a_plan_requests_allocator_setting_is_canonical_or_refused_naming_it() -> None:
    base = {
        "workload": {"model": {"family": "builtin", "name": "mlp"}, "inputs": {"kind": "features", "dim": 8}},
        "effective_batch_size": 8,
    }
    assert parse_plan_request(base).alloc_conf is None
    spelled = parse_plan_request({**base, "alloc_conf": " expandable_segments : TRUE "})
    assert spelled.alloc_conf == "expandable_segments:True"
    with pytest.raises(SpecError, match="alloc_conf: unknown option 'expandable'"):
        parse_plan_request({**base, "alloc_conf": "expandable:True"})
