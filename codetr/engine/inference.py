"""Load a trained detector from a checkpoint, and run it on single images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from codetr.config import Config, config_from_dict
from codetr.data.collate import collate
from codetr.data.transforms import make_lsj_transforms, make_test_transforms
from codetr.convert import load_any_checkpoint
from codetr.engine.checkpoint import load_model_state
from codetr.errors import CheckpointError, DataError
from codetr.models.detector import TRAINING_ONLY_PREFIXES, DeformableDETR, build_detector


@dataclass
class LoadedDetector:
    model: DeformableDETR
    cfg: Config
    cat_ids: list[int]
    class_names: list[str]
    epoch: int


def load_detector(ckpt: str | Path, device: torch.device | str = "cpu", use_ema: bool = True,
                  deploy: bool = True) -> LoadedDetector:
    """Rebuild the model a checkpoint was trained with and load its weights (EMA weights if present).

    deploy=True builds the one-to-one detector alone: the training-only parameters (Co-DETR's branches `aux.*`,
    H-DETR's / Group-DETR's extra query rows) are left out, so the deployed model has the baseline's parameters
    and cost. deploy=False keeps them (for analyses of the auxiliary heads, and `codetr eval --branch`).
    """
    state = load_any_checkpoint(ckpt)  # a released Sense-X / mmdet 3.x file is converted in memory
    cfg = config_from_dict(state["config"])
    cfg.model.backbone.pretrained = ""  # the checkpoint already holds the trained backbone
    weights = state["model"]
    if use_ema and state.get("ema"):
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    elif not use_ema and (state.get("weights_only") or {}).get("weights") == "ema":  # `codetr export --weights-only`
        raise CheckpointError(f"{ckpt} is a weights-only export of the EMA weights: the raw weights (--no-ema, "
                              "instability without --ema) are in the full checkpoint, or export with --no-ema")
    if deploy:  # whatever the method, the deployed model is the one-to-one baseline
        cfg.model.aux.heads = []
        cfg.model.method = "deformable_detr"
        weights = {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    model = build_detector(cfg.model, state["num_classes"])
    load_model_state(model, weights, source=str(ckpt))
    model.to(device).eval()
    return LoadedDetector(model, cfg, list(state["cat_ids"]), list(state["class_names"]),
                          (state.get("position") or {}).get("epoch", 0))


def open_image(path: str | Path) -> PIL.Image.Image:
    """The RGB image in `path`, fully decoded (as the evaluation's dataset reads it); DataError naming the file if
    it is missing, truncated, corrupt or too large to decode safely."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"image not found: {file}")
    try:
        with PIL.Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {file}: {error}") from None


@torch.no_grad()
def predict_image(detector: LoadedDetector, image: PIL.Image.Image) -> dict[str, torch.Tensor]:
    """Detections for one PIL image: {scores [k], labels [k], boxes [k, 4] xyxy in image pixels}."""
    data = detector.cfg.data
    transforms = (make_lsj_transforms(False, data.lsj_size) if data.lsj
                  else make_test_transforms(data.test_size, data.test_max_size))
    width, height = image.size
    target = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "image_id": 0,
        "orig_size": torch.tensor([height, width]),
        "size": torch.tensor([height, width]),
    }
    tensor, target = transforms(image, target)
    device = next(detector.model.parameters()).device
    batch = collate([(tensor, target)]).to(device)
    outputs = detector.model(batch.images, batch.masks)
    extent = torch.as_tensor(target.get("box_extent", [height, width]), device=device)[None]  # LSJ: the padded square
    result = detector.model.postprocess(outputs, extent)[0]
    return {k: v.cpu() for k, v in result.items()}
