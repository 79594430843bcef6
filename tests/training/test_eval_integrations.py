"""A plan's eval micro-batch applied to the Hugging Face Trainer and to PyTorch Lightning, and
planned for them: the Trainer's eval loader and a Lightning eval loader take it."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, Trainer

from tests.training.test_integrations import WORKLOAD, args, make_plan
from tuner.errors import PlanError
from tuner.integrations import hf, lightning
from tuner.results import Plan
from tuner.spec import DeviceSpec

LIGHTNING = importlib.util.find_spec("lightning") or importlib.util.find_spec("pytorch_lightning")


def with_eval(plan: Plan, eval_batch: int = 40) -> Plan:
    return plan.model_copy(update={"eval_micro_batch_size": eval_batch})


def test_hf_apply_plan_sets_the_eval_batch(tmp_path: Any) -> None:
    applied = hf.apply_plan(args(tmp_path), with_eval(make_plan(micro=5, steps=3)))
    assert applied.per_device_eval_batch_size == 40
    assert applied.per_device_train_batch_size == 5
    untouched = hf.apply_plan(args(tmp_path, per_device_eval_batch_size=7), make_plan())
    assert untouched.per_device_eval_batch_size == 7  # a plan without one leaves it alone


def test_the_trainers_eval_loader_uses_the_plans_eval_batch(tmp_path: Any) -> None:
    model = GPT2LMHeadModel(GPT2Config(**WORKLOAD.model.config))  # type: ignore[arg-type]
    dataset = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]} for _ in range(50)]
    trainer = Trainer(
        model=model,
        args=hf.apply_plan(args(tmp_path), with_eval(make_plan(micro=5, steps=3), 20)),
        train_dataset=dataset,
        eval_dataset=dataset,
    )  # type: ignore[arg-type]
    assert next(iter(trainer.get_eval_dataloader()))["input_ids"].shape[0] == 20


class DataWithEval:
    batch_size = 32
    eval_batch_size = 32


def test_lightning_eval_batch_size() -> None:
    data = DataWithEval()
    lightning.apply_eval_batch_size(data, with_eval(make_plan()))
    assert data.eval_batch_size == 40 and data.batch_size == 32
    hparams = type("Module", (), {"hparams": {"eval_batch_size": 8}})()
    lightning.apply_eval_batch_size(hparams, with_eval(make_plan(), 12))
    assert hparams.hparams == {"eval_batch_size": 12}
    with pytest.raises(PlanError, match=r"policy\.eval"):
        lightning.apply_eval_batch_size(data, make_plan())
    with pytest.raises(PlanError, match="eval_batch_size"):
        lightning.apply_eval_batch_size(object(), with_eval(make_plan()))


@pytest.mark.skipif(LIGHTNING is None, reason="Lightning is not installed")
def test_a_lightning_validation_loader_takes_the_eval_batch(tmp_path: Any) -> None:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    pl = lightning.lightning_module()
    samples = 24

    class Data(pl.LightningDataModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 1
            self.eval_batch_size = 1

        def _loader(self, batch_size: int) -> DataLoader[Any]:
            features = torch.randn(samples, 4)
            return DataLoader(TensorDataset(features, features.sum(dim=1, keepdim=True)), batch_size)

        def train_dataloader(self) -> DataLoader[Any]:
            return self._loader(self.batch_size)

        def val_dataloader(self) -> DataLoader[Any]:
            return self._loader(self.eval_batch_size)

    class Regression(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.eval_sizes: list[int] = []

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            features, targets = batch
            return torch.nn.functional.mse_loss(self.layer(features), targets)

        def validation_step(self, batch: Any, _index: int) -> None:
            self.eval_sizes.append(len(batch[0]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module, data = Regression(), Data()
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=[lightning.plan_callback(with_eval(make_plan(micro=3, steps=4), 8))],
    )
    trainer.fit(module, datamodule=data)
    assert data.eval_batch_size == 8 and module.eval_sizes == [8] * (samples // 8)


@pytest.mark.slow
def test_plan_for_trainer_plans_an_eval_batch_when_the_arguments_evaluate(tmp_path: Any) -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=128))
    training = args(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, eval_strategy="steps"
    )
    plan = hf.plan_for_trainer(
        model,
        training,
        device=DeviceSpec(name="Test GPU 2GiB", total_memory_bytes=2 << 30),
        inputs=32,
        local=True,
    )
    assert plan.policy.eval and plan.eval_micro_batch_size is not None
    assert plan.eval_micro_batch_size > plan.max_micro_batch_size["off"]
    assert hf.apply_plan(training, plan).per_device_eval_batch_size == plan.eval_micro_batch_size
