"""The total training loss: the one place every loss weight, lambda1 and lambda2 included, is applied.

The paper's Eq. 6 (Co-DETR, Sec. 3.3), with L decoder layers and K auxiliary heads:

    L_global = sum_{l=1}^{L} ( L~dec_l + lambda1 * sum_{i=1}^{K} L^dec_{i,l} + lambda2 * L^enc ),
    L^enc = sum_{i=1}^{K} L^enc_i                                                  (Eq. 3)

L~dec_l is the one-to-one (Hungarian) loss of decoder layer l, L^dec_{i,l} the loss of head i's
customized positive queries at layer l, L^enc_i head i's own one-to-many loss. lambda1 weighs the
positive queries; lambda2 * L^enc sits inside the sum over layers, so an auxiliary head's effective
weight is L * lambda2 (6 x 2.0 = 12 with the defaults: the released config's loss weights). The
two-stage encoder proposals' loss (a part of the one-to-one baseline) has weight 1.

Raw terms are named (the grammar: codetr/models/loss_terms.py):
    dec.d{l}.<type>, enc.<type>     the one-to-one head (decoder layer l, encoder proposals): L~dec_l
    dn.d{l}.<type>                  DINO's denoising queries at layer l: part of L~dec_l (weight 1)
    aux.<head>.<term>               auxiliary head i's own one-to-many losses: L^enc_i
    posq.<head>.d{l}.<type>         head i's positive queries through decoder layer l: L^dec_{i,l}
A term of type loss_cls / loss_bbox / loss_giou weighs cls_weight / bbox_weight / giou_weight (2, 5, 2);
an auxiliary head's term weighs that head's own weight for it (e.g. ATSS loss_bbox 2.0).

The rival methods of the paper's comparison are weighted here too:
    o2m.d{l}.<type>   H-DETR's one-to-many queries: lambda_one2many (model.hybrid.weight, 1.0) on every layer
    grp.d{l}.<type>   Group-DETR's groups 1..G-1; with group 0's dec.d{l} terms divided by G (the original
                      normalises by G x the boxes: the loss is the mean over groups). The encoder's term stays 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from codetr.config import ModelConfig, resolved_method
from codetr.models.loss_terms import LAYER_GROUPS, TermName, parse_term
from codetr.models.methods import QUERY_METHODS


def branch_factors(cfg: ModelConfig) -> dict[str, float]:
    """Eq. 6's factor on each group of terms: {"dec", "enc", "dn": 1, "posq": lambda1, "aux": L * lambda2}; a query
    method's own (codetr/models/methods/) on top: H-DETR's "o2m": lambda_one2many, Group-DETR's "dec" and "grp": 1 / G."""
    layers = cfg.transformer.num_decoder_layers
    factors = {"dec": 1.0, "enc": 1.0, "dn": 1.0, "posq": cfg.aux.lambda1, "aux": layers * cfg.aux.lambda2}
    method = QUERY_METHODS.get(resolved_method(cfg))
    if method is not None:
        factors.update(method.loss_factors(cfg))
    return factors


class LossWeights:
    """Maps a raw term's name to its weight."""

    def __init__(self, cfg: ModelConfig, aux_head_weights: dict[str, dict[str, float]] | None = None) -> None:
        self.type_weights = {"loss_cls": cfg.loss.cls_weight, "loss_bbox": cfg.loss.bbox_weight,
                             "loss_giou": cfg.loss.giou_weight}
        self.aux_head_weights = aux_head_weights or {}
        self.factors = branch_factors(cfg)

    def __call__(self, name: str) -> float:
        parsed = self._parse(name)
        return self.factors[parsed.group] * self._weight_in_head(parsed)

    def term_weight(self, name: str) -> float:
        """The term's weight inside its own head's loss, without lambda1 / lambda2."""
        return self._weight_in_head(self._parse(name))

    @staticmethod
    def _parse(name: str) -> TermName:
        try:
            return parse_term(name)
        except ValueError:
            raise KeyError(name) from None

    def _weight_in_head(self, term: TermName) -> float:
        if term.group in (*LAYER_GROUPS, "enc", "posq"):
            return self.type_weights[term.term]
        return self.aux_head_weights[term.head][term.term]


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
