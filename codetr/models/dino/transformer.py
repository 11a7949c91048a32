"""DINO's transformer (Zhang et al. 2023): Deformable-DETR's encoder, query selection by the best class
score, learned content queries, and a decoder whose positional queries come from each layer's reference box.

Shapes as in codetr/models/transformer.py: B = batch, S = tokens of all levels, Q = queries, C = d_model.
Boxes are cxcywh normalised to the valid (unpadded) image.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from codetr.box_ops import inverse_sigmoid
from codetr.models.dino.denoising import DINO_LOGIT_EPS, DenoisingQueries
from codetr.models.position_encoding import box_sine_embedding
from codetr.models.transformer import (
    DecoderLayer, DecoderOutput, EncoderLayer, EncoderProposals, FlatFeatures, box_branch, class_branch,
    grid_proposals, init_layer_linears, run_encoder,
)


def reference_sine_embedding(boxes: Tensor, d_model: int) -> Tensor:
    """[..., 4] cxcywh in [0, 1] -> [..., 2 * d_model]: d_model / 2 sine features per coordinate, in DINO's
    order (y, x, w, h)."""
    return box_sine_embedding(boxes[..., [1, 0, 2, 3]], num_feats=d_model // 2)


class DINODecoder(nn.Module):
    """Decoder layers with DINO's query positions, box refinement and "look forward twice".

    At every layer the positional query is ref_point_head(sine(reference box)) (an MLP 2C -> C -> C), not an
    input. Layer l refines its reference with box branch l applied to its raw output; the next layer starts
    from that box detached. The predictions of layer l come from the final LayerNorm of its output: class
    branch l, and box branch l added to the logit of layer l's reference box as the previous layer computed
    it, not detached, so a layer's box loss also trains the previous layer's box branch.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, num_classes: int) -> None:
        super().__init__()
        d_model = layer.norm1.normalized_shape[0]
        self.d_model = d_model
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.ref_point_head = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.norm = nn.LayerNorm(d_model)
        self.class_branches = nn.ModuleList(class_branch(d_model, num_classes) for _ in range(num_layers))
        self.box_branches = nn.ModuleList(box_branch(d_model) for _ in range(num_layers))
        for linear in self.ref_point_head[::2]:
            nn.init.xavier_uniform_(linear.weight)

    def forward(self, query: Tensor, query_pos: Tensor | None, reference: Tensor, memory: Tensor, feats: FlatFeatures,
                self_attn_mask: Tensor | None = None) -> DecoderOutput:
        """query [B, Q, C] content queries; reference [B, Q, 4] cxcywh starting boxes (detached inputs);
        query_pos must be None (DINO computes it). Same call as the Deformable-DETR decoder."""
        if query_pos is not None:
            raise ValueError("DINODecoder: the positional queries come from the reference boxes; pass None")
        out = DecoderOutput([], [], [])
        x = query
        ref_input, ref_for_loss = reference, reference
        ratios = feats.valid_ratios.repeat(1, 1, 2)[:, None]  # [B, 1, L, 4]
        for index, layer in enumerate(self.layers):
            ref_levels = ref_input[:, :, None] * ratios  # [B, Q, L, 4], in each level's padded coordinates
            pos = self.ref_point_head(reference_sine_embedding(ref_levels[:, :, 0], self.d_model))
            x = layer(x, pos, ref_levels, memory, feats, self_attn_mask)
            refined = (self.box_branches[index](x) + inverse_sigmoid(ref_input, DINO_LOGIT_EPS)).sigmoid()
            hidden = self.norm(x)
            out.logits.append(self.class_branches[index](hidden))
            out.boxes.append((self.box_branches[index](hidden) + inverse_sigmoid(ref_for_loss, DINO_LOGIT_EPS)).sigmoid())
            out.hidden.append(hidden)
            ref_for_loss, ref_input = refined, refined.detach()
        return out


class DINOTransformer(nn.Module):
    """Encoder + query selection + DINODecoder. The encoder's proposals are scored by class branch and box
    branch of their own (mmdet's cls_branches[L] / reg_branches[L]); the top Q by their best class score
    give the matching queries' reference boxes (detached); the content queries are learned [Q, C]."""

    def __init__(self, num_classes: int, num_queries: int = 900, d_model: int = 256, num_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, ffn_dim: int = 2048, dropout: float = 0.0,
                 num_levels: int = 5, num_points: int = 4) -> None:
        super().__init__()
        self.activation_checkpointing = False  # see codetr/models/checkpointing.py
        self.d_model = d_model
        self.num_queries = num_queries
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        encoder_layer = EncoderLayer(d_model, num_heads, ffn_dim, dropout, num_levels, num_points)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_encoder_layers))
        decoder_layer = DecoderLayer(d_model, num_heads, ffn_dim, dropout, num_levels, num_points)
        self.decoder = DINODecoder(decoder_layer, num_decoder_layers, num_classes)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_class_branch = class_branch(d_model, num_classes)
        self.enc_box_branch = box_branch(d_model)
        self.content_queries = nn.Embedding(num_queries, d_model)
        nn.init.normal_(self.content_queries.weight)
        nn.init.xavier_uniform_(self.enc_output.weight)
        init_layer_linears([*self.encoder_layers, *self.decoder.layers])

    def encode(self, feats: FlatFeatures) -> Tensor:
        """Returns the encoder memory [B, S, C]."""
        return run_encoder(self.encoder_layers, feats, self.activation_checkpointing)

    def propose(self, memory: Tensor, feats: FlatFeatures) -> EncoderProposals:
        """Score every token as a proposal around its grid box; keep the Q best by their highest class score.

        Returns the selected proposals only: logits [B, Q, K], boxes [B, Q, 4] (not detached: the encoder's
        loss trains on them) and their detached box logits [B, Q, 4] (the decoder's starting boxes).
        """
        grid_unact, valid = grid_proposals(feats)
        tokens = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        logits = self.enc_class_branch(tokens)
        boxes_unact = self.enc_box_branch(tokens) + grid_unact
        topk = logits.max(-1).values.topk(self.num_queries, dim=1).indices
        topk_logits = torch.gather(logits, 1, topk[..., None].expand(-1, -1, logits.shape[-1]))
        topk_boxes_unact = torch.gather(boxes_unact, 1, topk[..., None].expand(-1, -1, 4))
        return EncoderProposals(topk_logits, topk_boxes_unact.sigmoid(), topk_boxes_unact.detach())

    def forward(self, feats: FlatFeatures, denoising: DenoisingQueries | None = None
                ) -> tuple[DecoderOutput, EncoderProposals, Tensor]:
        """Returns (decoder output over [denoising | matching] queries, the selected proposals, memory)."""
        memory = self.encode(feats)
        proposals = self.propose(memory, feats)
        content = self.content_queries.weight[None].expand(memory.shape[0], -1, -1)
        reference_unact = proposals.topk_boxes_unact
        mask = None
        if denoising is not None:
            content = torch.cat((denoising.content, content), 1)
            reference_unact = torch.cat((denoising.boxes_unact, reference_unact), 1)
            mask = denoising.attn_mask
        decoded = self.decoder(content, None, reference_unact.sigmoid(), memory, feats, mask)
        return decoded, proposals, memory
