"""train.activation_checkpointing: the same loss and gradients, less memory kept for backward."""
import pytest
import torch

from analysis.profile import synthetic_batch
from codetr.config import apply_overrides, get_preset
from codetr.models.checkpointing import use_activation_checkpointing
from codetr.models.criterion import build_criterion
from codetr.models.detector import build_detector
from codetr.models.total_loss import weighted_total


def loss_grads_and_saved_bytes(preset: str, overrides: list[str], checkpointing: bool):
    cfg = apply_overrides(get_preset(preset), overrides)
    torch.manual_seed(0)
    model = use_activation_checkpointing(build_detector(cfg.model, 5).train(), checkpointing)
    criterion = build_criterion(model, cfg.model)
    images, masks, targets = synthetic_batch(2, 96, 128, 5, torch.device("cpu"), seed=0)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(1)  # the same dropout / drop-path draws on both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(images, masks, targets)
    total, _ = weighted_total(criterion(outputs, targets), criterion.weights)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return total.detach(), grads, sum(saved)


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", ["model.transformer.dropout=0.1"]),  # dropout replays its draws in the recomputation
    ("co_tiny", []),
])
def test_checkpointing_keeps_the_numbers_and_saves_memory(preset, overrides):
    loss, grads, saved = loss_grads_and_saved_bytes(preset, overrides, checkpointing=False)
    loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved_bytes(preset, overrides, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=1e-6)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():  # float32; recomputation runs the same kernels on the same inputs
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-5 * (grad.abs().max().item() + 1e-12), rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
    assert saved_ckpt < 0.7 * saved, (saved_ckpt, saved)
