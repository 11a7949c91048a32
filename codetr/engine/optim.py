"""AdamW with the paper's parameter-wise learning rates, and the step schedule."""
from __future__ import annotations

import torch
from torch import nn

from codetr.config import OptimConfig

# Parameters whose names contain these get lr * lr_linear_proj_mult (Deformable-DETR's "linear_proj").
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: backbone (lr x lr_backbone_mult), sampling offsets / reference points
    (lr x lr_linear_proj_mult), everything else (lr). Frozen parameters are left out."""
    backbone, linear_proj, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone.") or ".backbone." in name:
            backbone.append(param)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            linear_proj.append(param)
        else:
            rest.append(param)
    groups = [
        {"name": "default", "params": rest, "lr": cfg.lr},
        {"name": "backbone", "params": backbone, "lr": cfg.lr * cfg.lr_backbone_mult},
        {"name": "linear_proj", "params": linear_proj, "lr": cfg.lr * cfg.lr_linear_proj_mult},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """Stepped once per epoch: lr x lr_drop_factor after each epoch listed in lr_drop_epochs."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_drop_epochs), gamma=cfg.lr_drop_factor)
