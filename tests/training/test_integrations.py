"""Applying a plan to the Hugging Face Trainer and to PyTorch Lightning."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from tuner.errors import PlanError
from tuner.integrations import hf, lightning
from tuner.results import Plan
from tuner.spec import DeviceSpec, parse_workload

WORKLOAD = parse_workload(
    {
        "model": {
            "family": "transformers",
            "config": {
                "model_type": "gpt2",
                "n_layer": 1,
                "n_embd": 32,
                "n_head": 2,
                "n_positions": 64,
                "vocab_size": 128,
            },
        },
        "inputs": {"kind": "tokens", "seq_len": 32},
    }
)


def make_plan(
    micro: int = 6,
    steps: int = 4,
    *,
    checkpointing: bool = True,
    world_size: int = 1,
    uneven: list[int] | None = None,
) -> Plan:
    return Plan(
        fingerprint=WORKLOAD.fingerprint(),
        workload=WORKLOAD,
        device=DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504),
        backend="estimate",
        effective_batch_size=micro * steps * world_size,
        world_size=world_size,
        micro_batch_size=micro,
        accumulation_steps=steps,
        micro_batch_sizes=uneven,
        gradient_checkpointing=checkpointing,
        max_micro_batch_size={"off": 4, "on": 6},
        memory_budget_bytes=80 << 30,
        predicted_peak_bytes=70 << 30,
    )


def args(tmp_path: Any, **kwargs: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


def checkpointing_of(training_args: TrainingArguments) -> bool:
    return bool(getattr(training_args, "activation_checkpointing", training_args.gradient_checkpointing))


def test_hf_apply_plan_returns_new_arguments_with_the_plan(tmp_path: Any) -> None:
    original = args(tmp_path, learning_rate=3e-4)
    applied = hf.apply_plan(original, make_plan())
    assert applied is not original
    assert (applied.per_device_train_batch_size, applied.gradient_accumulation_steps) == (6, 4)
    assert checkpointing_of(applied) and applied.gradient_checkpointing  # the old name mirrors the new
    kwargs = (
        getattr(applied, "activation_checkpointing_kwargs", None) or applied.gradient_checkpointing_kwargs
    )
    assert kwargs == {"use_reentrant": False}
    assert applied.learning_rate == 3e-4 and applied.output_dir == original.output_dir
    assert (original.per_device_train_batch_size, original.gradient_accumulation_steps) == (8, 1)
    assert not checkpointing_of(original)

    switched_off = hf.apply_plan(applied, make_plan(checkpointing=False))
    assert not checkpointing_of(switched_off) and not switched_off.gradient_checkpointing


def test_hf_trainer_uses_the_plans_micro_batch(tmp_path: Any) -> None:
    model = GPT2LMHeadModel(GPT2Config(**WORKLOAD.model.config))  # type: ignore[arg-type]
    dataset = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]} for _ in range(30)]
    trainer = Trainer(
        model=model, args=hf.apply_plan(args(tmp_path), make_plan(micro=5, steps=3)), train_dataset=dataset
    )  # type: ignore[arg-type]
    first_batch = next(iter(trainer.get_train_dataloader()))
    assert first_batch["input_ids"].shape[0] == 5
    assert trainer.args.gradient_accumulation_steps == 3


def test_hf_refuses_uneven_micro_batches_and_a_different_world_size(tmp_path: Any) -> None:
    with pytest.raises(PlanError, match="uneven"):
        hf.apply_plan(args(tmp_path), make_plan(micro=5, steps=3, uneven=[5, 5, 4]))
    with pytest.raises(PlanError, match="world_size=1"):
        hf.apply_plan(args(tmp_path), make_plan(world_size=2))


class DataModuleLike:
    batch_size = 32


class ModuleWithHparams:
    def __init__(self) -> None:
        self.hparams = {"batch_size": 32, "lr": 1e-3}


def test_lightning_trainer_kwargs_and_batch_size() -> None:
    plan = make_plan(micro=12, steps=5)
    assert lightning.trainer_kwargs(plan) == {"accumulate_grad_batches": 5}
    datamodule = DataModuleLike()
    lightning.apply_batch_size(datamodule, plan)
    assert datamodule.batch_size == 12
    module = ModuleWithHparams()
    lightning.apply_batch_size(module, plan)
    assert module.hparams == {"batch_size": 12, "lr": 1e-3}
    with pytest.raises(PlanError, match="batch_size"):
        lightning.apply_batch_size(object(), plan)
    with pytest.raises(PlanError, match="uneven"):
        lightning.trainer_kwargs(make_plan(micro=5, steps=3, uneven=[5, 5, 4]))


LIGHTNING = importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")


def test_lightning_callback_says_clearly_that_lightning_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where Lightning is installed, a None entry in sys.modules makes its import fail as if absent.
    for name in ("lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(PlanError, match="pip install lightning"):
        lightning.plan_callback(make_plan())


@pytest.mark.skipif(LIGHTNING is None, reason="Lightning is not installed")
def test_lightning_callback_applies_the_plan_when_fitting_starts() -> None:
    pl = lightning.lightning_module()
    trainer = pl.Trainer(
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        callbacks=[lightning.plan_callback(make_plan(micro=3, steps=7))],
    )
    module = ModuleWithHparams()
    trainer.callbacks[0].setup(trainer, module, "fit")
    assert trainer.accumulate_grad_batches == 7 and module.hparams["batch_size"] == 3


@pytest.mark.skipif(LIGHTNING is None, reason="Lightning is not installed")
def test_a_lightning_fit_runs_with_the_plans_micro_batch_and_accumulation(tmp_path: Any) -> None:
    """A real `Trainer.fit` on CPU: every training batch holds the plan's micro-batch, and the
    optimizer steps once per `accumulation_steps` batches."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    pl = lightning.lightning_module()
    samples = 24

    class Data(pl.LightningDataModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 1  # replaced by the plan before the loader is made

        def train_dataloader(self) -> DataLoader[Any]:
            features = torch.randn(samples, 4)
            return DataLoader(TensorDataset(features, features.sum(dim=1, keepdim=True)), self.batch_size)

    class Regression(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.batch_sizes: list[int] = []
            self.optimizer_steps = 0

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            features, targets = batch
            self.batch_sizes.append(len(features))
            return torch.nn.functional.mse_loss(self.layer(features), targets)

        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            self.optimizer_steps += 1
            super().optimizer_step(*args, **kwargs)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    plan = make_plan(micro=3, steps=4)
    module, data = Regression(), Data()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[lightning.plan_callback(plan)],
    )
    trainer.fit(module, datamodule=data)
    assert data.batch_size == 3 and module.batch_sizes == [3] * (samples // 3)
    assert trainer.accumulate_grad_batches == 4
    assert module.optimizer_steps == trainer.global_step == samples // (3 * 4)


@pytest.mark.slow
def test_plan_for_trainer_plans_the_loop_the_trainer_runs(tmp_path: Any) -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=128))
    training = args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=8)
    plan = hf.plan_for_trainer(
        model,
        training,
        device=DeviceSpec(name="Test GPU 2GiB", total_memory_bytes=2 << 30),
        inputs=32,
        policy={"gradient_checkpointing": "off"},
        local=True,
    )
    assert plan.workload.loop.keeps_outputs is False  # compute_loss keeps only the loss
    assert plan.workload.precision == "fp32" and plan.effective_batch_size == 32
    assert plan.micro_batch_size * plan.accumulation_steps == 32
