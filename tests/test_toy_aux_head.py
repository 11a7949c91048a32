"""Adding an auxiliary head takes one class (declaring the AuxHead interface) plus one registration line; the
new kind is then a valid `model.aux.heads` entry, trains, and its terms are weighted by Eq. 6."""
import pytest
import torch
from torch import Tensor, nn

from codetr.config import AuxConfig, apply_overrides, get_preset
from codetr.errors import ConfigError
from codetr.models.co_detr.heads import AUX_HEADS, register_aux_head
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates
from codetr.models.criterion import build_criterion
from codetr.models.detector import build_detector
from codetr.models.total_loss import weighted_total


class ToyHead(nn.Module):
    """A 1x1-conv classifier on the finest map; each ground-truth box is its own single positive candidate, and the
    whole image is a negative one (Co-DETR pads the positive queries with negatives)."""

    kind = "toy"

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)
        self.loss_weights = {"loss_cls": 3.0}

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> "ToyHead":
        return cls(num_classes, in_channels)

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        logits = self.classifier(inputs.maps[0])  # [B, K, H, W]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
        candidates = []
        for boxes, labels, (height, width) in zip(inputs.gt_boxes, inputs.gt_labels, inputs.image_sizes.tolist()):
            image_box = boxes.new_tensor([[0.0, 0.0, width, height]])
            candidates.append(Candidates(
                boxes=torch.cat((boxes, image_box)), labels=torch.cat((labels, labels.new_tensor([self.num_classes]))),
                target_boxes=torch.cat((boxes, image_box)), features=None, num_gt=len(labels),
                num_classes=self.num_classes))
        return AuxHeadOutput({"loss_cls": loss}, candidates)


@pytest.fixture
def toy_registered():
    register_aux_head(ToyHead)  # the one line a new head needs
    yield
    AUX_HEADS.pop("toy")


def test_an_unregistered_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="model.aux.heads"):
        apply_overrides(get_preset("co_tiny"), ["model.aux.heads=[toy]"])


def test_a_registered_toy_head_trains_with_eq6_weights(toy_registered):
    cfg = apply_overrides(get_preset("co_tiny"), [
        "model.aux.heads=[toy,atss]", "model.num_queries=6", "model.transformer.d_model=32",
        "model.transformer.ffn_dim=32", "model.transformer.num_heads=4", "model.aux.content_feature=false"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=2).train()
    assert [type(h).__name__ for h in model.aux.heads] == ["ToyHead", "ATSSHead"]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
               {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]])}]
    out = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
    criterion = build_criterion(model, cfg.model)
    losses = criterion(out, targets)
    layers = cfg.model.transformer.num_decoder_layers
    assert {f"posq.toy.d{l}.loss_cls" for l in range(layers)} <= losses.keys() and "aux.toy.loss_cls" in losses
    # Eq. 6: an auxiliary term weighs num_decoder_layers x lambda2 x the head's own weight (3 x 2.0 x 3.0)
    assert criterion.weights("aux.toy.loss_cls") == pytest.approx(layers * 2.0 * 3.0)
    total, _ = weighted_total(losses, criterion.weights)
    total.backward()
    assert model.aux.heads[0].classifier.weight.grad.abs().sum() > 0
