"""transformers' Trainer with ``TrainingArguments(torch_compile=True, torch_compile_backend="lowbit")``
trains a tiny GPT-2 (no downloads) on CPU. Trainer passes no backend options, so the test swaps
the registered ``lowbit`` for the same backend with the eager inner compiler (Inductor takes
about 3 minutes here for this model); the name Trainer and accelerate resolve is still "lowbit"."""

import functools
import math

import pytest
import torch

import fxlowbit
from fxlowbit.examples import hf_model

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


def test_trainer_torch_compile_backend_lowbit(tmp_path, monkeypatch):
    from torch._dynamo.backends import registry

    eager_lowbit = functools.partial(fxlowbit.lowbit, options={"inner": "eager", "seed": 0})
    eager_lowbit._tags = ()  # what register_backend sets
    monkeypatch.setitem(registry._COMPILER_FNS, "lowbit", eager_lowbit)
    torch.manual_seed(0)
    model = hf_model("gpt2")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        torch_compile=True,
        torch_compile_backend="lowbit",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert out.global_step == 3 and len(losses) == 3
    assert all(math.isfinite(x) for x in losses) and math.isfinite(out.training_loss)
    plans = fxlowbit.last_plans()
    assert plans and plans[0].bytes_after < plans[0].bytes_before
    assert fxlowbit.last_report().entries  # the report of Trainer's compiled graphs


def test_accelerate_accepts_registered_backends_only():
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    from fxlowbit import integrations

    assert getattr(DynamoBackend, "_fxlowbit_patched", False)  # patched when accelerate was imported
    assert not integrations.patch_accelerate(__import__("accelerate.utils.dataclasses", fromlist=["x"]))
    plugin = TorchDynamoPlugin(backend="lowbit")
    assert plugin.to_kwargs()["backend"] == "lowbit" and DynamoBackend("lowbit") is DynamoBackend("LOWBIT")
    assert DynamoBackend("inductor") is DynamoBackend.INDUCTOR
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        DynamoBackend("no_such_backend")
