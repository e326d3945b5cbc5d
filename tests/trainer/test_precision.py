"""A stage-1 and a stage-2 DMD iteration under bf16 autocast on the CPU (``mixed_precision: true``) against float32.

Measured on the tiny configs (2026-12, this CPU): losses agree to 1.2e-4 (relative), the generator's and the
critic's gradients to a cosine similarity of 0.99997; the bounds below are 10x and 100x looser.
"""

import pytest
import torch
import torch.nn.functional as F

from trainer.distill import DistillTrainer
from trainer.networks import build_networks, build_text_encoder
from trainer.plan import plan_training
from utils.config import load_config

from ..conftest import ROOT

TINY = ROOT / "configs" / "tiny"
LOSS_REL, GRAD_COSINE = 2e-3, 0.997

pytestmark = pytest.mark.usefixtures("one_thread")


def _iteration(stage: str, mixed_precision: bool, logdir) -> tuple[dict, torch.Tensor, torch.Tensor, DistillTrainer]:
    """The logged values and the generator's and critic's gradients after iteration 0 (a generator step)."""
    name = "train_init" if stage == "init" else "train_long"
    cfg = load_config(TINY / f"{name}.yaml", ["vis_interval=0", f"mixed_precision={str(mixed_precision).lower()}"])
    plan = plan_training(cfg, logdir, stage=stage)
    trainer = DistillTrainer(plan, build_networks(plan), build_text_encoder(plan))
    values = trainer.iteration(0)
    grads = [torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
             for net in (trainer.nets.generator, trainer.nets.critic)]  # fmt: skip
    return values, *grads, trainer


@pytest.mark.parametrize("stage", ["init", "long"])
def test_a_bf16_iteration_matches_float32(stage, tmp_path):
    full = _iteration(stage, False, tmp_path / "float32")
    low = _iteration(stage, True, tmp_path / "bf16")
    trainer = low[3]
    assert trainer.plan.mixed_precision and trainer.plan.device.type == "cpu"
    assert next(trainer.nets.teacher.parameters()).dtype == torch.bfloat16
    assert next(trainer.nets.generator.parameters()).dtype == torch.float32, "the master weights stay float32"
    assert "generator_loss" in low[0]
    assert low[0] != full[0], "the bf16 iteration computed exactly what float32 did: autocast was not active"
    for key, value in full[0].items():
        assert abs(low[0][key] - value) <= LOSS_REL * abs(value) + 1e-9, key
    for full_grad, low_grad in zip(full[1:3], low[1:3], strict=True):
        assert torch.isfinite(low_grad).all()
        assert F.cosine_similarity(full_grad, low_grad, dim=0) >= GRAD_COSINE
