"""The names of the raw loss terms: the one grammar the criterion writes and the total loss, the training log,
the progress bar and the analyses read.

    dec.d{l}.<type>          the one-to-one queries at decoder layer l (0-based; the last is the output layer)
    enc.<type>               the encoder proposals (two-stage models)
    dn.d{l}.<type>           DINO's denoising queries at decoder layer l
    o2m.d{l}.<type>          H-DETR's one-to-many queries at decoder layer l
    grp.d{l}.<type>          Group-DETR's groups 1..G-1 at decoder layer l (group 0 is `dec`)
    aux.<head>.<term>        a Co-DETR auxiliary head's own loss term (the head's names, e.g. loss_rpn_cls)
    posq.<head>.d{l}.<type>  that head's customized positive queries at decoder layer l
<type> is loss_cls, loss_bbox or loss_giou; <head> is the head's log name (atss, faster_rcnn, atss_2, ...).
Beside the loss terms the training log counts each head's one-to-many assignment: stats.<head>.positives / .gts.
"""
from __future__ import annotations

from dataclasses import dataclass

from codetr.models.methods import QUERY_METHODS

# Groups whose terms are per decoder layer, with the query-branch term types (loss_cls / loss_bbox / loss_giou):
# the one-to-one queries, DINO's denoising queries and every query method's own (o2m, grp: its `term_group`).
LAYER_GROUPS = ("dec", "dn", *(method.term_group for method in QUERY_METHODS.values()))
GROUPS = (*LAYER_GROUPS, "enc", "aux", "posq")
# The one-to-one detector's own loss (what the "detr" head of the conflict analysis back-propagates).
ONE_TO_ONE_GROUPS = ("dec", "enc")


@dataclass(frozen=True)
class TermName:
    """A parsed term name. layer: the decoder layer (None for enc / aux); head: the auxiliary head (aux, posq)."""

    group: str
    term: str
    layer: int | None = None
    head: str | None = None

    def __str__(self) -> str:
        parts = [self.group]
        if self.head is not None:
            parts.append(self.head)
        if self.layer is not None:
            parts.append(f"d{self.layer}")
        return ".".join([*parts, self.term])

    @property
    def short_type(self) -> str:
        """The term's type without its prefix: 'cls', 'bbox', 'giou', 'rpn_cls', ... (the progress bar's columns)."""
        return self.term.removeprefix("loss_")


def layer_term(group: str, layer: int, term: str) -> str:
    """'dec', 2, 'loss_cls' -> 'dec.d2.loss_cls'."""
    return str(TermName(group, term, layer=layer))


def encoder_term(term: str) -> str:
    return str(TermName("enc", term))


def aux_term(head: str, term: str) -> str:
    return str(TermName("aux", term, head=head))


def posq_term(head: str, layer: int, term: str) -> str:
    return str(TermName("posq", term, layer=layer, head=head))


def head_stat(head: str, count: str) -> str:
    """The training log's count of a head's assignment: ('atss', 'positives') -> 'stats.atss.positives'."""
    return f"stats.{head}.{count}"


def _layer_index(part: str) -> int | None:
    """'d3' -> 3; None for anything else."""
    return int(part[1:]) if part[:1] == "d" and part[1:].isdigit() else None


def parse_term(name: str) -> TermName:
    """The parts of a term name; ValueError if `name` is not a loss term (e.g. 'loss', 'lr', 'time')."""
    parts = name.split(".")
    group = parts[0]
    if group == "enc" and len(parts) == 2:
        return TermName(group, parts[1])
    if group in LAYER_GROUPS and len(parts) == 3 and _layer_index(parts[1]) is not None:
        return TermName(group, parts[2], layer=_layer_index(parts[1]))
    if group == "aux" and len(parts) == 3:
        return TermName(group, parts[2], head=parts[1])
    if group == "posq" and len(parts) == 4 and _layer_index(parts[2]) is not None:
        return TermName(group, parts[3], layer=_layer_index(parts[2]), head=parts[1])
    raise ValueError(f"{name!r} is not a loss term name (see codetr/models/loss_terms.py)")


def is_loss_term(name: str) -> bool:
    try:
        parse_term(name)
    except ValueError:
        return False
    return True
