"""Training-time query methods beside the one-to-one queries: H-DETR's hybrid matching and Group-DETR's groups.

(Co-DETR's collaborative heads are the other way to add positives: codetr/models/co_detr/.) A method here
declares a `QueryLayout` (how many queries the transformer makes in training, which blocks self-attention keeps
apart) and `training_queries(decoded)`, which picks its queries' predictions out of the decoder's output for the
criterion. Adding one is one file plus one line in QUERY_METHODS.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from codetr.config import ModelConfig, resolved_method
from codetr.models.methods.common import QueryLayout, QuerySetOutput, block_attention_mask
from codetr.models.methods.group_detr import GroupQueries
from codetr.models.methods.hybrid_matching import HybridMatching

if TYPE_CHECKING:
    from codetr.models.transformer import DecoderOutput


class QueryMethod(Protocol):
    name: str  # its model.method value
    term_group: str  # its loss terms: <term_group>.d{l}.<type>
    layout: QueryLayout

    def training_queries(self, decoded: DecoderOutput) -> QuerySetOutput | None: ...


QUERY_METHODS: dict[str, type] = {HybridMatching.name: HybridMatching, GroupQueries.name: GroupQueries}


def build_query_method(cfg: ModelConfig) -> QueryMethod | None:
    """The config's query method, or None (the one-to-one baseline and Co-DETR add no queries of this kind)."""
    method = QUERY_METHODS.get(resolved_method(cfg))
    return method.from_config(cfg) if method is not None else None


__all__ = ["QueryLayout", "QuerySetOutput", "QueryMethod", "QUERY_METHODS", "block_attention_mask",
           "build_query_method"]
