"""Training-time query methods beside the one-to-one queries: H-DETR's hybrid matching and Group-DETR's groups.

(Co-DETR's collaborative heads are the other way to add positives: codetr/models/co_detr/.) A method here
declares a `QueryLayout` (how many queries the transformer makes in training, which blocks self-attention keeps
apart) and `training_queries(decoded)`, which picks its queries' predictions out of the decoder's output for the
criterion; its `term_group` (its loss terms `<term_group>.d{l}.<type>`), the architectures it builds on, and its
`loss_factors` (what codetr/models/total_loss.py multiplies its terms by). Adding one is one file plus one line in
QUERY_METHODS, plus its settings' section in codetr/config.py's ModelConfig if it has any.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

from codetr.config import ModelConfig, resolved_method
from codetr.models.methods.common import QueryLayout, QuerySetOutput, block_attention_mask
from codetr.models.methods.group_detr import GroupQueries
from codetr.models.methods.hybrid_matching import HybridMatching

if TYPE_CHECKING:
    from codetr.models.transformer import DecoderOutput


class QueryMethod(Protocol):
    name: ClassVar[str]  # its model.method value
    term_group: ClassVar[str]  # its loss terms: <term_group>.d{l}.<type>
    architectures: ClassVar[tuple[str, ...]]  # the model.architecture values it builds on
    layout: QueryLayout

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> QueryMethod: ...

    @staticmethod
    def loss_factors(cfg: ModelConfig) -> dict[str, float]: ...

    def training_queries(self, decoded: DecoderOutput) -> QuerySetOutput | None: ...


QUERY_METHODS: dict[str, type] = {HybridMatching.name: HybridMatching, GroupQueries.name: GroupQueries}


def build_query_method(cfg: ModelConfig) -> QueryMethod | None:
    """The config's query method, or None (the one-to-one baseline and Co-DETR add no queries of this kind)."""
    method = QUERY_METHODS.get(resolved_method(cfg))
    return method.from_config(cfg) if method is not None else None


__all__ = ["QueryLayout", "QuerySetOutput", "QueryMethod", "QUERY_METHODS", "block_attention_mask",
           "build_query_method"]
