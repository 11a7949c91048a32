"""The deformable transformer: encoder, two-stage query selection and the refining decoder.

Shapes use B = batch, L = levels, S = sum of H_l * W_l over levels (flattened tokens), Q = queries,
C = d_model. Boxes are cxcywh normalised to the valid (unpadded) image; `_unact` marks logits
(pre-sigmoid) values.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.box_ops import inverse_sigmoid
from codetr.models.checkpointing import maybe_checkpoint
from codetr.models.methods.common import QueryLayout, block_attention_mask
from codetr.models.ms_deform_attn import MSDeformAttn
from codetr.models.position_encoding import box_sine_embedding


@dataclass
class FlatFeatures:
    """Multi-level maps flattened into one token sequence, with what attention needs to index it."""

    tokens: Tensor  # [B, S, C]
    pos: Tensor  # [B, S, C] sine encoding + level embedding
    padding_mask: Tensor  # [B, S] True = padding
    spatial_shapes: Tensor  # [L, 2] int64 (H_l, W_l)
    level_start_index: Tensor  # [L] int64
    valid_ratios: Tensor  # [B, L, 2] (w, h) fraction of each map that is not padding
    strides: tuple[int, ...] = (8, 16, 32, 64)  # each level's stride in input pixels
    # (H_l, W_l) per level as Python ints, the values of spatial_shapes: code that needs them as sizes reads
    # these, since reading a tensor's values is data-dependent under torch.export (codetr/engine/export.py)
    level_shapes: tuple[tuple[int, int], ...] = ()

    def shapes_hw(self) -> list[tuple[int, int]]:
        """(H_l, W_l) per level as Python ints (from `level_shapes`, else read off `spatial_shapes`)."""
        return list(self.level_shapes) or [(int(h), int(w)) for h, w in self.spatial_shapes.tolist()]


def flatten_levels(maps: list[Tensor], masks: list[Tensor], pos: list[Tensor], level_embed: Tensor,
                   strides: tuple[int, ...] = (8, 16, 32, 64)) -> FlatFeatures:
    """maps[l]: [B, C, H_l, W_l], masks[l]: [B, H_l, W_l] (True = pad), pos[l]: [B, C, H_l, W_l]; strides: per
    level, in input pixels."""
    level_shapes = tuple((m.shape[-2], m.shape[-1]) for m in maps)
    shapes = shape_tensor(level_shapes, maps[0].device)
    starts = torch.cat((shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
    tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[l] for l, p in enumerate(pos)], 1)
    padding = torch.cat([m.flatten(1) for m in masks], 1)
    valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
    return FlatFeatures(tokens, pos_flat, padding, shapes, starts, valid_ratios, tuple(strides), level_shapes)


def shape_tensor(level_shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """[L, 2] int64 (H_l, W_l). Symbolic sizes (torch.export with dynamic shapes) are stacked one by one:
    torch.as_tensor would fix them to the traced example's values."""
    if all(isinstance(size, int) for hw in level_shapes for size in hw):
        return torch.as_tensor(level_shapes, dtype=torch.long, device=device)
    return torch.stack([torch.stack([torch.scalar_tensor(size, dtype=torch.long, device=device) for size in hw])
                        for hw in level_shapes])


def valid_ratio(mask: Tensor) -> Tensor:
    """mask [B, H, W] (True = pad) -> [B, 2] (valid width / W, valid height / H)."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float()
    valid_w = (~mask[:, 0, :]).sum(1).float()
    return torch.stack((valid_w / width, valid_h / height), -1)


def ffn(d_model: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Linear. Dropout modules only when p > 0: on CPU even Dropout(0) and an
    in-place ReLU cost ~10% of the FFN's time on 20k encoder tokens."""
    if dropout > 0:
        return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model),
                             nn.Dropout(dropout))
    return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d_model))


def init_layer_linears(layers: list[nn.Module]) -> None:
    """Xavier-uniform weights and zero biases for every layer's FFN, and Xavier-uniform for the decoder
    self-attention's output projection (Deformable-DETR, H-DETR and mmdet Xavier-fill every matrix of the
    transformer; torch already fills the attention's input projection so)."""
    for layer in layers:
        for linear in layer.ffn:
            if isinstance(linear, nn.Linear):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.zeros_(linear.bias)
        if isinstance(getattr(layer, "self_attn", None), nn.MultiheadAttention):
            nn.init.xavier_uniform_(layer.self_attn.out_proj.weight)


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention -> LN -> FFN -> LN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, num_levels: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, num_heads, num_levels, num_points)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = ffn(d_model, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, feats: FlatFeatures, reference_points: Tensor) -> Tensor:
        attended = self.self_attn(
            x + feats.pos, reference_points, x, feats.spatial_shapes, feats.level_start_index, feats.padding_mask,
            level_shapes=feats.level_shapes or None,
        )
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.ffn(x))


def token_centres(feats: FlatFeatures) -> list[Tensor]:
    """Per level, every token's pixel centre as (x, y) normalised to each image's valid region:
    [B, H_l * W_l, 2]; tokens in the padding get values above 1."""
    centres = []
    for level, (height, width) in enumerate(feats.shapes_hw()):
        ratios = feats.valid_ratios[:, level]  # [B, 2] (w, h)
        ys, xs = torch.meshgrid(
            torch.arange(height, device=ratios.device, dtype=torch.float32) + 0.5,
            torch.arange(width, device=ratios.device, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        pixels = torch.stack((xs.flatten(), ys.flatten()), -1)[None]  # [1, HW, 2]
        # (valid w * W_l, valid h * H_l) as two products, not times torch.tensor([W_l, H_l]): the same float32
        # numbers, and under torch.export with dynamic shapes the sizes stay symbolic
        extent = torch.stack((ratios[:, 0] * width, ratios[:, 1] * height), -1)  # [B, 2]
        centres.append(pixels / extent[:, None])
    return centres


def encoder_reference_points(feats: FlatFeatures) -> Tensor:
    """Each token's own pixel centre, normalised to the valid region, then mapped to every level.

    Returns [B, S, L, 2] (x, y) in the padded-map coordinates each level's sampling expects.
    """
    points = torch.cat(token_centres(feats), 1)  # [B, S, 2], relative to each image's valid region
    return points[:, :, None] * feats.valid_ratios[:, None]


def run_encoder(layers: nn.ModuleList, feats: FlatFeatures, checkpointing: bool = False) -> Tensor:
    """The encoder layers on the flattened features, each token attending around its own position; with
    `checkpointing` each layer recomputes its activations in backward. Returns the memory [B, S, C]."""
    reference_points = encoder_reference_points(feats)
    x = feats.tokens
    for layer in layers:
        x = maybe_checkpoint(checkpointing, layer, x, feats, reference_points)
    return x


class DecoderLayer(nn.Module):
    """Post-norm: self-attention -> LN -> deformable cross-attention -> LN -> FFN -> LN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, num_levels: int, num_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = ffn(d_model, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        feats: FlatFeatures,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        q = k = x + query_pos
        attended = self.self_attn(q, k, x, attn_mask=self_attn_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attended))
        attended = self.cross_attn(
            x + query_pos, reference_points, memory, feats.spatial_shapes, feats.level_start_index, feats.padding_mask,
            level_shapes=feats.level_shapes or None,
        )
        x = self.norm2(x + self.dropout(attended))
        return self.norm3(x + self.ffn(x))


def class_branch(d_model: int, num_classes: int) -> nn.Linear:
    """Linear classifier whose bias starts every class at probability 0.01 (focal-loss prior)."""
    branch = nn.Linear(d_model, num_classes)
    nn.init.constant_(branch.bias, -math.log((1 - 0.01) / 0.01))
    return branch


def box_branch(d_model: int) -> nn.Sequential:
    """MLP d-d-d-4 predicting a box delta in logit space; the last layer starts at zero (no change)."""
    branch = nn.Sequential(
        nn.Linear(d_model, d_model), nn.ReLU(inplace=True), nn.Linear(d_model, d_model), nn.ReLU(inplace=True),
        nn.Linear(d_model, 4),
    )
    nn.init.zeros_(branch[-1].weight)
    nn.init.zeros_(branch[-1].bias)
    return branch


@dataclass
class DecoderOutput:
    logits: list[Tensor]  # per layer [B, Q, num_classes]
    boxes: list[Tensor]  # per layer [B, Q, 4] cxcywh normalised (what the loss sees)
    hidden: list[Tensor]  # per layer [B, Q, C]


def apply_box_delta(delta: Tensor, reference: Tensor, eps: float = 1e-5) -> Tensor:
    """A box branch's output [.., 4] (logit space) applied to a reference [.., 4] cxcywh or [.., 2] (x, y)
    in [0, 1]: a 2-d reference point moves the centre and the size comes from the delta alone. `eps` clamps
    the reference before its logit (Deformable-DETR 1e-5, DINO 1e-3)."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    return torch.cat((delta[..., :2] + inverse_sigmoid(reference, eps), delta[..., 2:]), -1).sigmoid()


class Decoder(nn.Module):
    """Decoder layers, with iterative box refinement and "look forward twice" as options.

    with_box_refine: each layer refines its input reference with its own box branch; the next layer
    receives the refined box detached (so layers do not co-adapt through the reference). Without it,
    every layer predicts relative to the same reference, and the class and box branches are one module
    shared by all layers (as in Deformable-DETR).
    look_forward_twice (refine only): the loss of layer l sees its box computed from the NON-detached
    refinement of layer l-1, so its gradient also reaches the previous layer's box branch (H-DETR / DINO).
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, num_classes: int, look_forward_twice: bool = True,
                 with_box_refine: bool = True) -> None:
        super().__init__()
        d_model = layer.norm1.normalized_shape[0]
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        if with_box_refine:  # independent branches per layer
            self.class_branches = nn.ModuleList(class_branch(d_model, num_classes) for _ in range(num_layers))
            self.box_branches = nn.ModuleList(box_branch(d_model) for _ in range(num_layers))
        else:  # one module, listed once per layer
            self.class_branches = nn.ModuleList([class_branch(d_model, num_classes)] * num_layers)
            self.box_branches = nn.ModuleList([box_branch(d_model)] * num_layers)
        self.with_box_refine = with_box_refine
        self.look_forward_twice = look_forward_twice and with_box_refine

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        feats: FlatFeatures,
        self_attn_mask: Tensor | None = None,
    ) -> DecoderOutput:
        """query, query_pos: [B, Q, C]; reference: [B, Q, 4] cxcywh or [B, Q, 2] (x, y), in [0, 1] of the
        valid region (two-stage proposals and positive-query boxes arrive detached; learned reference
        points do not, so the box loss trains them)."""
        out = DecoderOutput([], [], [])
        x = query
        ref_input = reference  # what the layer samples around (detached after the first refinement)
        ref_for_loss = reference
        for index, layer in enumerate(self.layers):
            ratios = feats.valid_ratios if ref_input.shape[-1] == 2 else feats.valid_ratios.repeat(1, 1, 2)
            x = layer(x, query_pos, ref_input[:, :, None] * ratios[:, None], memory, feats, self_attn_mask)
            delta = self.box_branches[index](x)
            out.boxes.append(apply_box_delta(delta, ref_for_loss if self.look_forward_twice else ref_input))
            out.logits.append(self.class_branches[index](x))
            out.hidden.append(x)
            if self.with_box_refine:
                refined = apply_box_delta(delta, ref_input)
                ref_for_loss = refined
                ref_input = refined.detach()  # the next layer refines from a fixed starting box
        return out


@dataclass
class EncoderProposals:
    logits: Tensor  # [B, S, num_classes]; targets are class-agnostic (every object is class 0)
    boxes: Tensor  # [B, S, 4] cxcywh in [0, 1]
    topk_boxes_unact: Tensor  # [B, Q, 4] selected proposals, detached logits


class DeformableTransformer(nn.Module):
    """Encoder + queries (learned, or two-stage proposal selection) + decoder (Deformable-DETR).

    two_stage=False: `query_embed` [Q, 2C] holds each query's (positional, content) halves and
    `reference_points` maps the positional half to a learned 2-d reference point. two_stage=True: the
    encoder scores every token as a proposal and the top Q become the queries' reference boxes.

    num_train_queries (H-DETR, Group-DETR: codetr/models/methods/): the queries in training, the one-to-one Q
    first; the learned rows beyond Q are `extra_queries` (training only, made last so that for the same seed every
    other parameter equals the baseline's). `forward(feats, layout)` runs them all, without a layout the first Q.
    """

    def __init__(
        self,
        num_classes: int,
        num_queries: int = 300,
        d_model: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        num_levels: int = 4,
        num_points: int = 4,
        two_stage: bool = True,
        with_box_refine: bool = True,
        mixed_selection: bool = True,
        look_forward_twice: bool = True,
        num_train_queries: int | None = None,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = False  # see codetr/models/checkpointing.py
        self.d_model = d_model
        self.num_queries = num_queries
        self.two_stage = two_stage
        self.mixed_selection = mixed_selection and two_stage
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        encoder_layer = EncoderLayer(d_model, num_heads, ffn_dim, dropout, num_levels, num_points)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(num_encoder_layers))

        decoder_layer = DecoderLayer(d_model, num_heads, ffn_dim, dropout, num_levels, num_points)
        self.decoder = Decoder(decoder_layer, num_decoder_layers, num_classes, look_forward_twice, with_box_refine)

        if two_stage:  # proposals from encoder tokens, positional queries from the selected boxes
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
            if with_box_refine:
                self.enc_class_branch = class_branch(d_model, num_classes)
                self.enc_box_branch = box_branch(d_model)
            else:  # without refinement the encoder shares the decoder's one pair of branches
                self.enc_class_branch = self.decoder.class_branches[0]
                self.enc_box_branch = self.decoder.box_branches[0]
            if self.mixed_selection:
                self.content_queries = nn.Embedding(num_queries, d_model)
            nn.init.xavier_uniform_(self.enc_output.weight)
            nn.init.xavier_uniform_(self.pos_trans.weight)
        else:
            self.query_embed = nn.Embedding(num_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
            # A 2-d reference point has no size: the first box branch starts at sigmoid(-2) = 0.12 wide and
            # high, as in Deformable-DETR (its two-stage boxes start at their proposal's size instead).
            nn.init.constant_(self.decoder.box_branches[0][-1].bias[2:], -2.0)
        init_layer_linears([*self.encoder_layers, *self.decoder.layers])
        # Learned rows of the training-only queries (two-stage without mixed selection has none: its queries come
        # from the proposals alone). Each row is as wide as the one-to-one rows it extends.
        num_extra = (num_train_queries or num_queries) - num_queries
        learned = self.content_queries if self.mixed_selection else None if two_stage else self.query_embed
        self.extra_queries = nn.Embedding(num_extra, learned.embedding_dim) if num_extra and learned else None

    def encode(self, feats: FlatFeatures) -> Tensor:
        """Returns the encoder memory [B, S, C]."""
        return run_encoder(self.encoder_layers, feats, self.activation_checkpointing)

    def propose(self, memory: Tensor, feats: FlatFeatures, num_proposals: int | None = None) -> EncoderProposals:
        """Score every encoder token as a proposal around a fixed grid box and keep the top `num_proposals` (Q)."""
        grid_unact, valid = grid_proposals(feats)
        tokens = memory.masked_fill(~valid[..., None], 0.0)
        tokens = self.enc_output_norm(self.enc_output(tokens))
        logits = self.enc_class_branch(tokens)
        boxes_unact = self.enc_box_branch(tokens) + grid_unact
        # Selection by class channel 0 (the encoder is trained class-agnostic: every object is class 0).
        # As in the released code, invalid tokens are not excluded: their memory is zeroed and their box
        # is at infinity, so they score low and, if picked, start as a full-image box.
        topk = logits[..., 0].topk(num_proposals or self.num_queries, dim=1).indices
        topk_boxes_unact = torch.gather(boxes_unact, 1, topk[..., None].expand(-1, -1, 4)).detach()
        return EncoderProposals(logits, boxes_unact.sigmoid(), topk_boxes_unact)

    def queries_from_boxes(self, boxes_unact: Tensor) -> tuple[Tensor, Tensor]:
        """[B, N, 4] box logits -> (content queries, positional queries), each [B, N, C]; with mixed selection
        the content queries are the first N learned rows."""
        embedded = box_sine_embedding(boxes_unact.sigmoid(), num_feats=self.d_model // 2)
        pos, content = self.pos_trans_norm(self.pos_trans(embedded)).split(self.d_model, -1)
        if self.mixed_selection:
            rows = self.learned_rows(self.content_queries, boxes_unact.shape[1])
            content = rows[None].expand(boxes_unact.shape[0], -1, -1)
        return content, pos

    def learned_rows(self, table: nn.Embedding, count: int) -> Tensor:
        """The first `count` learned query rows [count, width]: the one-to-one `table`, then `extra_queries`."""
        if count <= self.num_queries:
            return table.weight[:count]
        return torch.cat((table.weight, self.extra_queries.weight[: count - self.num_queries]))

    def learned_queries(self, batch: int, count: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Single-stage queries, the first `count` (Q) rows: (content [B, N, C], positional [B, N, C], reference
        points [B, N, 2])."""
        pos, content = self.learned_rows(self.query_embed, count or self.num_queries).split(self.d_model, -1)
        pos, content = pos[None].expand(batch, -1, -1), content[None].expand(batch, -1, -1)
        return content, pos, self.reference_points(pos).sigmoid()

    def forward(self, feats: FlatFeatures, layout: QueryLayout | None = None
                ) -> tuple[DecoderOutput, EncoderProposals | None, Tensor]:
        """layout: the training queries of a query method (H-DETR, Group-DETR), else the Q one-to-one queries
        alone. The decoder output holds every query, the one-to-one ones first; `proposals` are the encoder's."""
        layout = layout or QueryLayout(self.num_queries, self.num_queries, (self.num_queries,))
        memory = self.encode(feats)
        if self.two_stage:
            proposals = self.propose(memory, feats, layout.proposals)
            # Group-DETR's groups share the top-Q proposals: the selection is tiled once per group.
            boxes_unact = proposals.topk_boxes_unact.repeat(1, layout.total // layout.proposals, 1)
            content, pos = self.queries_from_boxes(boxes_unact)
            reference = boxes_unact.sigmoid()
        else:
            proposals = None
            content, pos, reference = self.learned_queries(memory.shape[0], layout.total)
        mask = block_attention_mask(layout.blocks, memory.device) if len(layout.blocks) > 1 else None
        decoded = self.decoder(content, pos, reference, memory, feats, mask)
        return decoded, proposals, memory


def grid_proposals(feats: FlatFeatures) -> tuple[Tensor, Tensor]:
    """One box per token: its pixel centre, size 0.05 * 2^level, in logit space.

    Returns (boxes_unact [B, S, 4], valid [B, S]); invalid = padding or too close to the border.
    """
    boxes = torch.cat(
        [torch.cat((centres, torch.full_like(centres, 0.05 * 2.0**level)), -1)
         for level, centres in enumerate(token_centres(feats))],
        1,
    )
    valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~feats.padding_mask
    boxes_unact = torch.log(boxes / (1 - boxes)).masked_fill(~valid[..., None], float("inf"))
    return boxes_unact, valid
