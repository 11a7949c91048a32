"""The total training loss: the one place every loss weight, lambda1 and lambda2 included, is applied.

    L = L_dec + lambda1 * sum_i L_aux_i + lambda2 * sum_i sum_l L_posq_{i,l}        (Co-DETR, Eq. 6)

Raw terms are named (see codetr/models/criterion.py):
    dec.d{l}.<type>, enc.<type>     the one-to-one head (decoder layer l, encoder proposals): L_dec
    aux.<head>.<term>               auxiliary head i's own one-to-many losses: L_aux_i
    posq.<head>.d{l}.<type>         head i's positive queries through decoder layer l: L_posq_{i,l}
A term of type loss_cls / loss_bbox / loss_giou weighs cls_weight / bbox_weight / giou_weight (2, 5, 2);
an auxiliary head's term weighs that head's own weight for it (e.g. ATSS loss_bbox 2.0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from codetr.config import ModelConfig


def effective_lambdas(cfg: ModelConfig) -> tuple[float, float]:
    """(lambda1, lambda2) as applied. weighting="released" reproduces the official config, which folds
    num_decoder_layers * 2.0 into the auxiliary heads and weighs the positive queries 1.0: with its
    (swapped) names that is lambda1_eff = L * lambda2 and lambda2_eff = lambda1."""
    aux = cfg.aux
    if aux.weighting == "released":
        return cfg.transformer.num_decoder_layers * aux.lambda2, aux.lambda1
    return aux.lambda1, aux.lambda2


class LossWeights:
    """Maps a raw term's name to its weight."""

    def __init__(self, cfg: ModelConfig, aux_head_weights: dict[str, dict[str, float]] | None = None) -> None:
        self.type_weights = {"loss_cls": cfg.loss.cls_weight, "loss_bbox": cfg.loss.bbox_weight,
                             "loss_giou": cfg.loss.giou_weight}
        self.aux_head_weights = aux_head_weights or {}
        self.lambda1, self.lambda2 = effective_lambdas(cfg)

    def __call__(self, name: str) -> float:
        group = name.split(".")[0]
        head_factor = {"aux": self.lambda1, "posq": self.lambda2}.get(group, 1.0)
        return head_factor * self.term_weight(name)

    def term_weight(self, name: str) -> float:
        """The term's weight inside its own head's loss, without lambda1 / lambda2."""
        group, *_, term = name.split(".")
        if group in ("dec", "enc", "posq"):
            return self.type_weights[term]
        if group == "aux":
            return self.aux_head_weights[name.split(".")[1]][term]
        raise KeyError(name)


def weighted_total(losses: dict[str, Tensor], weights: LossWeights) -> tuple[Tensor, dict[str, Tensor]]:
    """(total, weighted terms under the same names). A term without a weight is an error, never a
    silent 0 or 1."""
    weighted = {}
    for name, value in losses.items():
        try:
            weighted[name] = value * weights(name)
        except KeyError:
            raise KeyError(f"loss term {name!r} has no weight") from None
    return torch.stack(list(weighted.values())).sum(), weighted
