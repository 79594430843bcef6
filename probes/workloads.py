"""Build model, optimizer and batch factory from a `WorkloadSpec`: the one builder every backend uses.

`build_workload(spec, device=...)` returns a `BuiltWorkload`; it works on a real device, on
`meta` (parameter counting without memory) and under `FakeTensorMode` (the estimator): nothing
here reads tensor values. Everything that cannot be built (an unknown `model_type`, kwargs a
factory does not take, a factory that raises) is a `ModelBuildError` naming the spec field.
An out-of-memory error while building is re-raised as is: for a probe it means "does not fit".

Where each family's gradient checkpointing comes from:
- transformers: `gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`
  (`activation_checkpointing_enable`, its new name, where transformers has it);
- builtin: each model's `blocks` through `torch.utils.checkpoint` (see `probes.builtin_models`);
- torchvision: every top-level child that holds parameters is checkpointed as one segment;
- python: the module's own `gradient_checkpointing_enable` (a transformers model) or
  `gradient_checkpointing` switch (a builtin-style model) where it has one, else as torchvision.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from probes.builtin_models import BlockModel, DecoderOutput, build_builtin
from tuner.block_checkpointing import CheckpointedForward, checkpoint_blocks
from tuner.errors import ModelBuildError
from tuner.results import WorkloadFacts
from tuner.settings import get_settings
from tuner.spec import ImageInputs, TokensInputs, WorkloadSpec

Batch = dict[str, torch.Tensor]
Implementation = Literal["foreach", "fused", "for-loop"]

INPUT_KEYS = {"tokens": "input_ids", "image": "pixel_values", "features": "features"}
"""`inputs.kind` → the batch key of the model's input; the targets are always under `labels`."""

# Memory does not depend on the learning rate; these are ordinary values that make a step
# visibly change the weights, in bf16 too.
LEARNING_RATES = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-2, "adafactor": 1e-2}
_IGNORE_INDEX = -100
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass
class BuiltWorkload:
    """A built model on a device, with what the train step needs to run it."""

    spec: WorkloadSpec
    model: nn.Module
    device: torch.device
    facts: WorkloadFacts
    gradient_checkpointing: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the mixed precisions; None for `fp32` and `bf16`."""
        return _AUTOCAST_DTYPES.get(self.spec.precision)

    @property
    def parameter_dtype(self) -> torch.dtype:
        """bf16 for `bf16`, else fp32 (the mixed precisions keep fp32 weights)."""
        return torch.bfloat16 if self.spec.precision == "bf16" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's autocast context for this precision (a no-op where there is none)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        context: contextlib.AbstractContextManager[Any] = torch.autocast(self.device.type, dtype=dtype)
        return context

    def make_optimizer(self, *, implementation: Implementation | None = None) -> torch.optim.Optimizer:
        """The spec's optimizer over the trainable parameters. `implementation` overrides the
        spec's (e.g. `foreach` where a fused kernel does not exist on the building device)."""
        return build_optimizer(
            self.model,
            self.spec.optimizer.name,
            implementation or self.spec.optimizer.implementation,
            self.device,
        )

    def make_batch(self, batch_size: int) -> Batch:
        """Random inputs and labels of `batch_size` samples on the device (no value is read,
        so this works under `FakeTensorMode`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        inputs = self.spec.inputs
        if isinstance(inputs, TokensInputs):
            return self._token_batch(batch_size, inputs)
        if isinstance(inputs, ImageInputs):
            shape: tuple[int, ...] = (batch_size, inputs.channels, inputs.height, inputs.width)
        else:
            shape = (batch_size, inputs.dim)
        return {
            INPUT_KEYS[inputs.kind]: torch.randn(shape, device=self.device, dtype=self.parameter_dtype),
            "labels": torch.randint(0, inputs.num_classes, (batch_size,), device=self.device),
        }

    def _token_batch(self, batch_size: int, inputs: TokensInputs) -> Batch:
        vocab = _vocab_size(self.model)
        ids = torch.randint(0, vocab, (batch_size, inputs.seq_len), device=self.device)
        labels = ids
        if self.spec.model.family == "transformers" and self.spec.model.task == "seq-classification":
            num_labels = int(getattr(self.model.config, "num_labels", 2))
            labels = torch.randint(0, num_labels, (batch_size,), device=self.device)
        return {"input_ids": ids, "labels": labels}

    def forward(self, batch: Batch) -> ForwardResult:
        """The model's forward on one batch: the scalar mean loss (plus the MoE auxiliary loss
        where there is one) and the model's output object. Call it inside `autocast()`; the
        train step does, and keeps or drops the output as the spec's loop says."""
        family = self.spec.model.family
        if family == "transformers":
            out = self.model(**batch)
            return ForwardResult(_as_scalar(out.loss), out)
        inputs = batch[INPUT_KEYS[self.spec.inputs.kind]]
        labels = batch["labels"]
        if family == "python" and _accepts_labels(self.model):
            out = self.model(inputs, labels=labels)
        else:
            out = self.model(inputs)
        return ForwardResult(_loss_from_output(out, labels), out)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The scalar mean loss of one batch, the output dropped (see `forward`)."""
        return self.forward(batch).loss


class ForwardResult(NamedTuple):
    """What one forward returns to the train step."""

    loss: torch.Tensor
    """The scalar loss that backward starts from."""
    output: Any
    """The model's own output (logits and whatever else it returns): alive through backward
    and the optimizer step in a loop that keeps it, dropped before backward otherwise."""


def build_workload(
    spec: WorkloadSpec,
    *,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> BuiltWorkload:
    """Build the spec's model on `device` (in training mode, with the precision's weight dtype),
    seeding torch's generators with `seed` first so that two builds are identical."""
    target = torch.device(device)
    torch.manual_seed(seed)
    family = spec.model.family
    weight_dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    # Built in place, on the device and in the weight dtype: no transient fp32 copy on the GPU,
    # and no `.to()`, which under FakeTensorMode swaps every parameter and can fail.
    with torch.device(target), _default_dtype(weight_dtype):
        if family == "transformers":
            model = _build_transformers(spec, weight_dtype)
        elif family == "torchvision":
            model = _build_torchvision(spec)
        elif family == "builtin":
            model = _build_builtin(spec)
        else:
            model = _build_python(spec)
    # transformers keeps some tensors in fp32 on purpose (`_keep_in_fp32_modules`, rotary tables).
    expected_dtype = None if family == "transformers" else weight_dtype
    if _misplaced(model, target, expected_dtype):  # e.g. a factory that chose its own device
        model = model.to(target) if expected_dtype is None else model.to(target, expected_dtype)
    model.train()
    if gradient_checkpointing:
        _enable_checkpointing(model, family)
    return BuiltWorkload(
        spec=spec,
        model=model,
        device=target,
        facts=_facts(model, family),
        gradient_checkpointing=gradient_checkpointing,
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _misplaced(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether a tensor is off the device, or a floating parameter not in `dtype` (None: any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type != device.type or (device.index is not None and tensor.device != device):
            return True
    return dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters())


# ------------------------------------------------------------------------------------ families


def _build_transformers(spec: WorkloadSpec, dtype: torch.dtype) -> nn.Module:
    import transformers

    # Building from a bare config makes transformers log advice meant for checkpoint users
    # (e.g. "loss_type=None ... unrecognized"); on a probe's stderr it only confuses.
    transformers.logging.set_verbosity_error()

    config_dict = dict(spec.model.config or {})
    model_type = str(config_dict.pop("model_type"))
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
    except ValueError:
        raise ModelBuildError(
            f"model.config.model_type {model_type!r} is not a model type that transformers "
            f"{transformers.__version__} knows."
        ) from None
    config.use_cache = False  # training keeps no key/value cache
    if spec.model.task == "seq-classification" and getattr(config, "pad_token_id", None) is None:
        # transformers refuses batches > 1 without a padding id; 0 marks no position of random ids
        # specially enough to change the memory.
        config.pad_token_id = 0
    auto_class = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "seq-classification": transformers.AutoModelForSequenceClassification,
    }[spec.model.task]
    dtype_key = "dtype" if _version_at_least(transformers.__version__, (4, 56)) else "torch_dtype"
    try:
        model: nn.Module = auto_class.from_config(config, attn_implementation="sdpa", **{dtype_key: dtype})
    except torch.OutOfMemoryError:
        raise
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise ModelBuildError(
                f"model.task {spec.model.task!r} is not available for model_type {model_type!r} "
                "in transformers."
            ) from None
        raise ModelBuildError(f"model.config: transformers cannot build {model_type!r}: {exc}") from exc
    except Exception as exc:
        raise ModelBuildError(
            f"model.config: transformers cannot build {model_type!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return model


def _build_torchvision(spec: WorkloadSpec) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ModelBuildError(
            "model.family 'torchvision' needs the torchvision package, which this environment lacks."
        ) from None
    kwargs = dict(spec.model.kwargs)
    if isinstance(spec.inputs, ImageInputs):
        kwargs.setdefault("num_classes", spec.inputs.num_classes)
    try:
        model: nn.Module = torchvision.models.get_model(str(spec.model.name), **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        raise ModelBuildError(
            f"model.name/kwargs: torchvision cannot build {spec.model.name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return model


def _build_builtin(spec: WorkloadSpec) -> nn.Module:
    return build_builtin(str(spec.model.name), spec.model.kwargs, spec.inputs)


def _build_python(spec: WorkloadSpec) -> nn.Module:
    factory = str(spec.model.factory)
    module_name, _, function_name = factory.partition(":")
    package = module_name.split(".", 1)[0]
    # The spec checked the allowlist where it was parsed; the worker's settings decide here.
    if package not in get_settings().allowed_factory_package_set:
        raise ModelBuildError(
            f"model.factory package {package!r} is not allowed on this worker; "
            "list it in the TUNER_ALLOWED_FACTORY_PACKAGES setting to allow it."
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelBuildError(
            f"model.factory {factory!r}: cannot import module {module_name!r} here ({exc}): install the "
            f"package that provides it where the probe runs (the worker's environment), or start that "
            "process from a directory (or with a PYTHONPATH) from which it imports."
        ) from None
    except Exception as exc:
        raise ModelBuildError(
            f"model.factory {factory!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ModelBuildError(
            f"model.factory {factory!r}: module {module_name!r} has no function {function_name!r}."
        )
    config_class = _config_class_of(function)
    if config_class is None:
        try:
            inspect.signature(function).bind(**spec.model.kwargs)
        except TypeError as exc:
            raise ModelBuildError(f"model.kwargs do not fit factory {factory!r}: {exc}.") from None
        except ValueError:
            pass  # no signature to check (a builtin or C function): let the call decide
    try:
        if config_class is not None:
            model = _build_pretrained_class(function, config_class, spec.model.kwargs, factory)
        else:
            model = function(**spec.model.kwargs)
    except (torch.OutOfMemoryError, ModelBuildError):
        raise
    except Exception as exc:
        # `from exc`: the factory's own frames reach the traceback a probe child sends its caller.
        raise ModelBuildError(f"model.factory {factory!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelBuildError(
            f"model.factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def _config_class_of(factory: Any) -> type | None:
    """The config class of a transformers-style model class (`PreTrainedModel.config_class`);
    None for a plain function or an `nn.Module` class without one."""
    if not isinstance(factory, type):
        return None
    config_class = getattr(factory, "config_class", None)
    if isinstance(config_class, type) and callable(getattr(config_class, "to_diff_dict", None)):
        return config_class
    return None


def _build_pretrained_class(
    model_class: type, config_class: type, kwargs: dict[str, Any], factory: str
) -> nn.Module:
    """`model_class(config_class(**kwargs["config"]))`: a custom-code model built as its script
    builds it (see `tuner.custom_code`)."""
    extra = sorted(set(kwargs) - {"config"})
    if extra:
        raise ModelBuildError(
            f"model.kwargs of the model class {factory!r} take only 'config' (its config as a dict), "
            f"got {extra}."
        )
    values = kwargs.get("config", {})
    if not isinstance(values, dict):
        raise ModelBuildError(f"model.kwargs.config of {factory!r} must be a dict of its config's values.")
    try:
        config = config_class(**values)
    except Exception as exc:
        raise ModelBuildError(
            f"model.kwargs.config: {config_class.__name__} refuses it: {type(exc).__name__}: {exc}"
        ) from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # training keeps no key/value cache
    model: nn.Module = model_class(config)
    return model


# ------------------------------------------------------------------------- checkpointing


def _enable_checkpointing(model: nn.Module, family: str) -> None:
    # transformers 5 renamed `gradient_checkpointing_enable` (now a deprecated alias) to
    # `activation_checkpointing_enable`; both take the kwargs of `torch.utils.checkpoint`.
    renamed = getattr(model, "activation_checkpointing_enable", None)
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if family in ("transformers", "python") and (callable(renamed) or callable(enable)):
        try:
            if callable(renamed):
                renamed(activation_checkpointing_kwargs={"use_reentrant": False})
            elif callable(enable):
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        except ValueError as exc:
            # A custom-code model that inherits the switch but refuses it (MiniMind's): checkpoint
            # its repeated blocks instead, as its user would (`tuner.training.checkpoint_blocks`).
            try:
                checkpoint_blocks(model)
            except ValueError:
                raise ModelBuildError(f"model: gradient checkpointing is not supported here: {exc}") from None
    elif isinstance(model, BlockModel) or (
        family == "python" and isinstance(getattr(model, "gradient_checkpointing", None), bool)
    ):
        model.gradient_checkpointing = True
    else:
        checkpoint_children(model)


def checkpoint_children(model: nn.Module) -> int:
    """Checkpoint every top-level child of `model` that holds parameters, each as one segment
    (parameter-free children such as activations or pooling save nothing worth recomputing).
    The child's `forward` is wrapped in place, so parameter names and state dicts do not change.
    Returns how many children were wrapped."""
    wrapped = 0
    for child in model.children():
        if isinstance(child.forward, CheckpointedForward) or not any(True for _ in child.parameters()):
            continue
        # An instance attribute shadows the class's `forward`, which `Module.__call__` looks up.
        setattr(child, "forward", CheckpointedForward(child, child.forward))  # noqa: B010
        wrapped += 1
    return wrapped


# ---------------------------------------------------------------------------------- optimizers


def build_optimizer(
    model: nn.Module, name: str, implementation: Implementation, device: torch.device
) -> torch.optim.Optimizer:
    """`name` (`adamw`, `adam`, `sgd` with momentum 0.9, `adafactor`) over the model's trainable
    parameters, with the `foreach`, `fused` or `for-loop` implementation; anything that cannot be
    built is a `ModelBuildError`."""
    params = [p for p in model.parameters() if p.requires_grad]
    flags: dict[str, bool] = {
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "for-loop": {"foreach": False},
    }[implementation]
    lr = LEARNING_RATES[name]
    try:
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, **flags)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, **flags)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, **flags)
        if name == "adafactor":
            adafactor = getattr(torch.optim, "Adafactor", None)
            if adafactor is None:
                raise ModelBuildError(
                    f"optimizer.name 'adafactor' needs torch.optim.Adafactor, which torch "
                    f"{torch.__version__} lacks."
                )
            if implementation == "fused":
                raise ModelBuildError(
                    "optimizer.implementation 'fused' does not exist for 'adafactor'; "
                    "use 'foreach' or 'for-loop'."
                )
            optimizer: torch.optim.Optimizer = adafactor(params, lr=lr, **flags)
            return optimizer
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelBuildError(
            f"optimizer.implementation {implementation!r} of {name!r} cannot be built on {device.type}: {exc}"
        ) from None
    raise ModelBuildError(f"optimizer.name {name!r} is not one of adamw, adam, sgd, adafactor.")


# ---------------------------------------------------------------------------------------- loss


def _loss_from_output(out: Any, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(out, DecoderOutput):
        loss = next_token_loss(out.logits, labels)
        return loss if out.aux_loss is None else loss + out.aux_loss
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out
    given = getattr(out, "loss", None)
    if isinstance(given, torch.Tensor):
        # A custom-code MoE model that returns its router loss beside the loss (MiniMind's
        # `res.loss + res.aux_loss`); transformers' own MoE models add it into `loss` themselves.
        aux = getattr(out, "aux_loss", None)
        if isinstance(aux, torch.Tensor) and aux.numel() == 1:
            return _as_scalar(given) + aux.reshape(())
        return _as_scalar(given)
    logits = _logits_of(out)
    if logits.dim() == 3 and labels.dim() == 2:
        return next_token_loss(logits, labels)
    return F.cross_entropy(logits.float(), labels)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t. The labels are shifted rather
    than the logits, so no copy of the (batch, seq, vocab) logits is made beyond the fp32 one
    that the loss needs (as transformers does)."""
    shifted = F.pad(labels, (0, 1), value=_IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=_IGNORE_INDEX
    )


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]  # e.g. torchvision's (logits, aux_logits) in training mode
    raise ModelBuildError(
        f"model: its output ({type(out).__name__}) is neither a loss, nor logits, nor has .loss/.logits."
    )


def _as_scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise ModelBuildError("model: its output has no loss; give it labels or return one.")
    return loss if loss.dim() == 0 else loss.mean()


def _accepts_labels(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


# --------------------------------------------------------------------------------------- facts


def _facts(model: nn.Module, family: str) -> WorkloadFacts:
    parameters = list(model.parameters())  # shared (tied) parameters appear once
    return WorkloadFacts(
        parameter_count=sum(p.numel() for p in parameters),
        trainable_parameter_count=sum(p.numel() for p in parameters if p.requires_grad),
        has_batchnorm=any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        has_moe=_has_moe(model, family),
    )


def _has_moe(model: nn.Module, family: str) -> bool:
    if any(getattr(m, "is_moe_layer", False) for m in model.modules()):
        return True
    if family == "python":  # a custom-code MoE layer keeps its experts in a list
        return any(
            isinstance(getattr(m, "experts", None), nn.ModuleList) and len(getattr(m, "experts")) > 1  # noqa: B009
            for m in model.modules()
        )
    if family != "transformers":
        return False
    config = getattr(model, "config", None)
    for key in _MOE_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return True
    return False


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    text_config = getattr(config, "text_config", None)  # multimodal transformers configs
    vocab = getattr(text_config, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    embeddings = getattr(model, "get_input_embeddings", None)
    if callable(embeddings):
        layer = embeddings()
        if isinstance(layer, nn.Embedding):
            return int(layer.num_embeddings)
    first = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if first is None:
        raise ModelBuildError("model: token inputs need a model with an embedding layer or a vocab_size.")
    return int(first.num_embeddings)


def _version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= minimum
