"""Tiny workload specs, one per model family the builder supports: small enough that two train
steps take milliseconds on a CPU, big enough to have every kind of layer."""

from __future__ import annotations

from typing import Any

from tuner.spec import WorkloadSpec, parse_workload

SEQ = 16
VOCAB = 128
TOKENS = {"kind": "tokens", "seq_len": SEQ}
FEATURES = {"kind": "features", "dim": 16, "num_classes": 10}
IMAGE = {"kind": "image", "channels": 3, "height": 16, "width": 16, "num_classes": 10}

# Not tiny, but as quick to trace: fake tensors hold no data, so a wide CNN at 128×128 costs an
# estimate no more than a small one, while its samples weigh tens of MiB, which dwarfs the
# allocator's 2 MiB segments and gives its estimated memory line a clear slope.
WIDE_CNN = parse_workload(
    {
        "model": {"family": "builtin", "name": "cnn", "kwargs": {"base_channels": 64, "num_stages": 2}},
        "inputs": {"kind": "image", "height": 128, "width": 128, "num_classes": 10},
    }
)

# Dropout off everywhere: gradients of two runs are then comparable.
_HF_COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
_DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_seq_len": SEQ}

MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mlp": ({"family": "builtin", "name": "mlp", "kwargs": {"hidden_dim": 32, "num_layers": 2}}, FEATURES),
    "cnn": (
        {
            "family": "builtin",
            "name": "cnn",
            "kwargs": {"base_channels": 8, "num_stages": 2, "blocks_per_stage": 1},
        },
        IMAGE,
    ),
    "decoder": ({"family": "builtin", "name": "decoder", "kwargs": {**_DECODER, "num_kv_heads": 2}}, TOKENS),
    "decoder-learned": (
        {
            "family": "builtin",
            "name": "decoder",
            "kwargs": {**_DECODER, "num_kv_heads": None, "positions": "learned", "tie_embeddings": False},
        },
        TOKENS,
    ),
    "decoder-moe": (
        {
            "family": "builtin",
            "name": "decoder",
            "kwargs": {
                **_DECODER,
                "num_kv_heads": 2,
                "use_moe": True,
                "num_experts": 4,
                "experts_per_token": 2,
            },
        },
        TOKENS,
    ),
    "gpt2": (
        {
            "family": "transformers",
            "config": {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_embd": 32,
                "n_head": 2,
                "n_positions": SEQ,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                **_HF_COMMON,
            },
        },
        TOKENS,
    ),
    "llama": (
        {
            "family": "transformers",
            "config": {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": SEQ,
                **_HF_COMMON,
            },
        },
        TOKENS,
    ),
    "mixtral": (
        {
            "family": "transformers",
            "config": {
                "model_type": "mixtral",
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": SEQ,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "output_router_logits": True,
                **_HF_COMMON,
            },
        },
        TOKENS,
    ),
    "python": (
        {"family": "python", "factory": "tests.probes.factories:classifier", "kwargs": {"in_features": 16}},
        FEATURES,
    ),
}
"""Family label → (model, inputs). `python` needs `tests` allowed (tests/probes/conftest.py)."""

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")


def tiny_spec(
    label: str, *, precision: str = "fp32", optimizer: dict[str, str] | None = None
) -> WorkloadSpec:
    model, inputs = MODELS[label]
    data: dict[str, Any] = {"model": model, "inputs": inputs, "precision": precision}
    if optimizer is not None:
        data["optimizer"] = optimizer
    return parse_workload(data)


# A MiniMind-sized decoder for the eval and token-budget probes: a trace of a few seconds, and
# attention long enough (seq 256) that a shorter length holds more tokens per micro-batch.
SMALL_LLAMA: dict[str, Any] = {
    "model": {
        "family": "transformers",
        "config": {
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 6400,
            "max_position_embeddings": 512,
        },
    },
    "inputs": {"kind": "tokens", "seq_len": 256},
    "precision": "bf16-mixed",
}
