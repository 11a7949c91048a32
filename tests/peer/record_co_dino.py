"""Record mmdetection 3.3's Co-DINO (projects/CO-DETR) on one batch: training loss pass and prediction.

Run by hand in the peer venv (never by CI, never imported by tests):

    ~/.cache/codetr-peer/venv/bin/python tests/peer/record_co_dino.py [--projects DIR]

mmdet's pip package has no projects/ folder: DIR is a checkout's `projects` folder (default:
$CODETR_MMDET_PROJECTS, else /tmp/masa_src/projects). Its CO-DETR/codetr package is loaded by importlib
under its own module name, which registers CoDETR, CoDINOHead, CoDinoTransformer, CoATSSHead and
CoStandardRoIHead into mmdet's registry. Its `get_aux_targets` moves randperm indices with `.cuda()`:
without CUDA, `torch.Tensor.cuda` returns the tensor itself while the loss runs (nothing else changes).

The model is the released co_dino_5scale_r50_8xb2_1x_coco.py (use_lsj=False) read from its config file
and shrunk: ResNet-18, embed_dims 64, 2 encoder / 3 decoder layers, FFN 128, 30 queries, 6 classes, 12
denoising queries (dynamic groups), RoI fc 64, ATSS feat 64, max_per_img 30; every other option and
loss weight is the released one (the auxiliary weights keep num_dec_layer 6 x lambda 2 = 12). The batch:
images of valid sizes (96, 128) and (128, 88) zero-padded to 128 x 128, 3 and 2 ground-truth boxes off
the pixel grid. Weights are not stored: as in record_deformable_detr.py (whose hashed_uniform /
fill_rule / filled_state_dict are imported), each tensor is hashed_uniform * scale + shift, `fill_rule`
being extended below for Co-DINO's keys. torch.manual_seed(0) precedes the loss pass; the denoising
noise and every torch.randperm are recorded, and replaying them from seed 0 must reproduce the
generator's final state (so nothing else drew from it).

Writes tests/fixtures/peer/co_dino.pt (plain tensors, dicts and lists: loads with weights_only=True):
  - "config" (sizes and options), "mmdet_model_cfg" (the shrunk mmdet config), "weights"
    [{key, shape, dtype, seed, scale, shift, alias_of, sum}]; "inputs": images [B, 3, H, W], img_shapes /
    ori_shapes [B, 2] (h, w), scale_factors [B, 2] (w, h), gt_bboxes [N, 4] xyxy pixels, gt_labels [N];
  - training pass: "neck" (5 maps), "memory" [B, S, C], "enc_cls" [B, S, K], "enc_coords_unact" [B, S, 4]
    (inf where mmdet marks a proposal invalid), "topk_indices" [B, Q], "topk_score" [B, Q, K],
    "topk_anchor" [B, Q, 4] (sigmoid), "topk_margin"; "dn": noisy_labels [Ndn_total] (the indices
    embedded), noise (the 4 draws in order: label-noise p, new labels, box rand_sign in {0, 1} before
    * 2 - 1, box rand_part), dn_label_query [B, Ndn, C], dn_bbox_query [B, Ndn, 4] (inverse sigmoid of
    cxcywh), attn_mask [Qt, Qt], dn_meta; "layers_cls" [L, B, Qt, K], "layers_boxes" [L, B, Qt, 4]
    (denoising queries first), "inter_references" [L + 1, B, Qt, 4]; "aux_downsample": the 6th map
    CoDINOHead.loss hands to the auxiliary heads (the other 5 are memory reshaped: checked, not stored);
  - "aux": per auxiliary branch in mmdet's order (0: CoStandardRoIHead, 1: CoATSSHead) get_aux_targets'
    coords / targets (cxcywh normalised), labels, label_weights, bbox_weights, feats, and forward_aux's
    layers_cls / layers_boxes; "sampling": RPN / RoI sampler indices, ATSS gt_inds, per image;
  - "losses": model.loss's dict as mmdet returns it (lists per level for RPN / ATSS), detached;
    "randperm": [{phase, perm int16}] in draw order, "random_calls": counts per random function;
  - "predictions": per image {scores, labels, bboxes} of model.predict(rescale=True) (soft-NMS);
    "predictions_before_nms": the top-k handed to mmcv's batched_nms; "predict_last_layer": eval-mode
    last-layer cls / boxes; "pre_nms_margin" (gap between consecutive top-(k + 1) scores),
    "score_margin" (between kept scores), "nms_iou_margin" (smallest |IoU - threshold|, same class);
  - "soft_nms_cases": 3 synthetic mmcv batched_nms(soft_nms) runs (inputs, dets, keep, iou_margin).

Also writes tests/fixtures/peer/co_dino_r50_layout.pt: {name: [{key, shape, alias_of}]} of the released
R50 model and of co_dino_5scale_swin_l_16xb1_1x_coco.py (projects/CO-DETR has no 9-encoder config).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record_deformable_detr as deformable  # noqa: E402  (hashed_uniform, fill_rule, filled_state_dict)

OUT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "peer"
CONFIG = "co_dino_5scale_r50_8xb2_1x_coco.py"
SWIN_CONFIG = "co_dino_5scale_swin_l_16xb1_1x_coco.py"
EMBED_DIMS, FFN_DIM, ROI_FC = 64, 128, 64
NUM_QUERY, NUM_CLASSES, NUM_DN_QUERIES, MAX_PER_IMG = 30, 6, 12, 30
ENCODER_LAYERS, DECODER_LAYERS = 2, 3
BATCH_HW = (128, 128)
IMG_SHAPES = [(96, 128), (128, 88)]  # valid (h, w) of each image inside the padded batch
ORI_SHAPES = [(144, 192), (160, 110)]  # the original sizes the images were resized from
GT_BBOXES = [  # xyxy pixels of the resized image, off the grid
    [[5.3, 7.9, 50.6, 60.2], [40.7, 22.4, 121.9, 88.3], [80.2, 50.6, 97.5, 68.1]],
    [[12.6, 9.1, 70.4, 55.8], [3.2, 66.7, 41.9, 123.3]],
]
GT_LABELS = [[1, 4, 0], [5, 2]]


def fill_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The deformable recorder's rule plus Co-DINO's own keys."""
    if key.endswith(("level_embeds", "query_embed.weight", "label_embedding.weight")):
        return 3**0.5, 0.0  # embeddings: unit variance, as mmdet's normal init
    if key.startswith("query_head.cls_branches") and key.endswith("bias") or key == "bbox_head.0.atss_cls.bias":
        return 0.5, -2.0  # focal / QFL scores around sigmoid(-2)
    if key.endswith(".scale") and len(shape) == 0:  # ATSS Scale modules multiply the box deltas
        return 0.1, 1.0
    return deformable_fill_rule(key, shape)


deformable_fill_rule = deformable.fill_rule
deformable.fill_rule = fill_rule  # filled_state_dict looks the rule up in its module


def load_codetr(projects: Path):
    """Import projects/CO-DETR/codetr as a package (it uses relative imports); registers its modules."""
    package = projects / "CO-DETR" / "codetr"
    spec = importlib.util.spec_from_file_location("mmdet_project_codetr", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def released_model_cfg(projects: Path, config_file: str):
    from mmengine.config import Config

    path = projects / "CO-DETR" / "configs" / "codino" / config_file
    cfg = Config.fromfile(str(path), import_custom_modules=False).model
    cfg.backbone.init_cfg = None
    return cfg


def build_small_cfg(projects: Path):
    cfg = released_model_cfg(projects, CONFIG)
    assert cfg.use_lsj is False and cfg.eval_module == "detr"
    cfg.backbone.depth = 18
    cfg.neck.update(in_channels=[64, 128, 256, 512], out_channels=EMBED_DIMS)
    head = cfg.query_head
    head.update(num_query=NUM_QUERY, num_classes=NUM_CLASSES)
    head.dn_cfg.group_cfg.num_dn_queries = NUM_DN_QUERIES
    head.positional_encoding.num_feats = EMBED_DIMS // 2
    # mmcv's BaseTransformerLayer default ffn_cfgs carries embed_dims 256: restate it at 64
    ffn = dict(type="FFN", embed_dims=EMBED_DIMS, feedforward_channels=FFN_DIM, num_fcs=2, ffn_drop=0.0,
               act_cfg=dict(type="ReLU", inplace=True))
    encoder, decoder = head.transformer.encoder, head.transformer.decoder
    encoder.update(num_layers=ENCODER_LAYERS, with_cp=0)  # with_cp > 0 wants FairScale; 0 wraps nothing
    encoder.transformerlayers.attn_cfgs.embed_dims = EMBED_DIMS
    decoder.num_layers = DECODER_LAYERS
    for attn in decoder.transformerlayers.attn_cfgs:
        attn.embed_dims = EMBED_DIMS
    for layer in (encoder.transformerlayers, decoder.transformerlayers):
        layer.update(feedforward_channels=FFN_DIM, ffn_dropout=0.0, ffn_cfgs=ffn)
    cfg.rpn_head.update(in_channels=EMBED_DIMS, feat_channels=EMBED_DIMS)
    roi = cfg.roi_head[0]
    roi.bbox_roi_extractor.out_channels = EMBED_DIMS
    roi.bbox_head.update(in_channels=EMBED_DIMS, fc_out_channels=ROI_FC, num_classes=NUM_CLASSES)
    cfg.bbox_head[0].update(num_classes=NUM_CLASSES, in_channels=EMBED_DIMS, feat_channels=EMBED_DIMS)
    cfg.test_cfg[0].max_per_img = MAX_PER_IMG
    return cfg


def make_batch(seed: int = 0):
    """This recorder's batch through the deformable recorder's builder."""
    return deformable.make_batch(seed, BATCH_HW, IMG_SHAPES, ORI_SHAPES, GT_BBOXES, GT_LABELS)


class Recorder:
    """Wraps callables to keep what they returned (and torch's random draws, tagged by phase)."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}
        self.draws: list[dict] = []  # {fn, phase, value, replay: (function, args, kwargs)}
        self.phase = "dn"  # outside the auxiliary heads only the denoising queries draw
        self._undo: list = []

    def patch(self, owner, name: str, replacement) -> None:
        self._undo.append((owner, name, vars(owner).get(name), name in vars(owner)))
        setattr(owner, name, replacement)

    def wrap(self, owner, name: str, key: str, phase=None, with_args: bool = False) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            previous = self.phase
            self.phase = phase(*args) if callable(phase) else (phase or previous)
            try:
                result = original(*args, **kwargs)
            finally:
                self.phase = previous
            self.calls.setdefault(key, []).append((args, result) if with_args else result)
            return result

        self.patch(owner, name, wrapped)

    def hook(self, module: torch.nn.Module, key: str) -> None:
        handle = module.register_forward_hook(lambda m, i, o: self.calls.setdefault(key, []).append((i, o)))
        self._undo.append((handle, None, None, None))

    def record_random(self) -> None:
        for fn in ("randperm", "rand_like", "randint_like"):
            original = getattr(torch, fn)

            def draw(*args, _original=original, _fn=fn, **kwargs):
                value = _original(*args, **kwargs)
                caller = sys._getframe(1)
                if caller.f_code.co_name == "random_choice":  # mmdet's RandomSampler: _sample_pos / _sample_neg
                    caller = caller.f_back
                side = "neg" if "neg" in caller.f_code.co_name or self._lines_have(caller, "neg_inds") else "pos"
                phase = f"{self.phase}/{side}" if _fn == "randperm" else self.phase
                replay_args = args if _fn == "randperm" else (torch.empty_like(args[0]), *args[1:])
                self.draws.append({"fn": _fn, "phase": phase, "value": value.clone(),
                                   "replay": (_original, replay_args, kwargs)})
                return value

            self.patch(torch, fn, draw)

    @staticmethod
    def _lines_have(frame, text: str) -> bool:
        """Whether the calling line or the next one (a call spanning two lines) mentions text."""
        import linecache

        return any(text in linecache.getline(frame.f_code.co_filename, frame.f_lineno + i) for i in (0, 1))

    def replay_draws(self) -> None:
        """Draw the recorded calls again from torch's current generator state."""
        for d in self.draws:
            function, args, kwargs = d["replay"]
            function(*args, **kwargs)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original, had in reversed(self._undo):
            if name is None:
                owner.remove()
            elif had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def smallest_gap(values: Tensor, count: int) -> float:
    """Smallest gap between consecutive values among the `count` largest of each row of [B, N]."""
    return deformable.smallest_gap(values.topk(count, dim=-1).values)


def iou_margin(boxes: Tensor, labels: Tensor, threshold: float) -> float:
    """Smallest |IoU - threshold| over pairs of boxes of the same label (how far NMS is from a flip)."""
    lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    pairs = (labels[:, None] == labels[None, :]) & torch.ones_like(inter, dtype=torch.bool).triu(1)
    return float((iou[pairs] - threshold).abs().min()) if pairs.any() else float("inf")


def detached(value):
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [detached(v) for v in value]
    return value


def record_loss(model, images: Tensor, samples: list) -> dict:
    head, transformer = model.query_head, model.query_head.transformer
    last = transformer.decoder.num_layers  # the encoder proposals' branch index
    with Recorder() as rec, torch.no_grad():
        rec.wrap(model, "extract_feat", "neck")
        rec.wrap(type(head.dn_generator), "__call__", "dn")
        rec.hook(head.dn_generator.label_embedding, "label_embedding")
        rec.wrap(transformer, "forward", "transformer")
        rec.wrap(transformer, "gen_encoder_output_proposals", "proposals")
        rec.hook(head.cls_branches[last], "enc_cls")
        rec.hook(head.reg_branches[last], "enc_reg")
        rec.wrap(head, "forward", "head")
        rec.wrap(head, "loss", "head_loss")
        rec.wrap(model.rpn_head, "loss_and_predict", "rpn", phase="rpn")
        rec.wrap(model.rpn_head.sampler, "sample", "rpn_sample")
        rec.wrap(model.roi_head[0], "loss", "roi", phase="rcnn")
        rec.wrap(model.roi_head[0].bbox_sampler, "sample", "roi_sample")
        rec.wrap(model.bbox_head[0], "loss", "atss", phase="atss")
        rec.wrap(model.bbox_head[0].assigner, "assign", "atss_assign")
        rec.wrap(head, "loss_aux", "loss_aux", phase=lambda x, pos, idx, samples: f"aux{idx}")
        rec.wrap(head, "get_aux_targets", "aux_targets")
        rec.wrap(head, "forward_aux", "forward_aux")
        rec.record_random()
        if not torch.cuda.is_available():  # get_aux_targets calls .cuda() on randperm indices
            rec.patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
        torch.manual_seed(0)
        losses = model.loss(images, copy.deepcopy(samples))
        state_after = torch.get_rng_state()
    torch.manual_seed(0)
    rec.replay_draws()
    assert torch.equal(torch.get_rng_state(), state_after), "a random draw was not recorded"
    calls = rec.calls
    assert all(len(calls[k]) == 1 for k in ("neck", "dn", "transformer", "head", "enc_cls", "enc_reg"))
    assert {d["fn"] for d in rec.draws if d["fn"] != "randperm"} <= {"rand_like", "randint_like"}
    assert [d["phase"] for d in rec.draws if d["fn"] != "randperm"] == ["dn"] * 4

    out: dict = {"neck": detached(calls["neck"][0])}
    _, inter_references, topk_score, topk_anchor, memory = calls["transformer"][0]
    out["memory"] = memory.permute(1, 0, 2).clone()
    enc_cls = calls["enc_cls"][0][1]
    enc_coords_unact = calls["enc_reg"][0][1] + calls["proposals"][0][1]  # as CoDinoTransformer adds them
    topk_indices = enc_cls.max(-1)[0].topk(NUM_QUERY, dim=1)[1]
    assert torch.equal(enc_cls.gather(1, topk_indices[..., None].expand(-1, -1, NUM_CLASSES)), topk_score)
    assert torch.equal(enc_coords_unact.gather(1, topk_indices[..., None].expand(-1, -1, 4)).sigmoid(), topk_anchor)
    assert enc_coords_unact.gather(1, topk_indices[..., None].expand(-1, -1, 4)).isfinite().all()
    out.update(enc_cls=enc_cls.clone(), enc_coords_unact=enc_coords_unact.clone(), topk_indices=topk_indices,
               topk_score=topk_score.clone(), topk_anchor=topk_anchor.clone(),
               topk_margin=smallest_gap(enc_cls.max(-1)[0], NUM_QUERY + 1))

    dn_label_query, dn_bbox_query, attn_mask, dn_meta = calls["dn"][0]
    noise = [d["value"] for d in rec.draws if d["fn"] != "randperm"]
    out["dn"] = {"noisy_labels": calls["label_embedding"][0][0][0].clone(), "noise": noise,
                 "noise_fns": [d["fn"] for d in rec.draws if d["fn"] != "randperm"],
                 "dn_label_query": dn_label_query.clone(), "dn_bbox_query": dn_bbox_query.clone(),
                 "attn_mask": attn_mask.clone(), "dn_meta": dict(dn_meta)}

    layers_cls, layers_boxes = calls["head"][0][:2]
    out.update(layers_cls=layers_cls.clone(), layers_boxes=layers_boxes.clone(),
               inter_references=inter_references.clone())
    aux_maps = calls["head_loss"][0][1]
    start = 0
    for feat in aux_maps[:-1]:  # the first 5 aux maps are the memory, reshaped
        b, c, h, w = feat.shape
        assert torch.equal(feat, out["memory"][:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w))
        start += h * w
    out["aux_downsample"] = aux_maps[-1].clone()

    names = ("coords", "labels", "targets", "label_weights", "bbox_weights", "feats")
    out["aux"] = []
    for targets, (cls, boxes, _, _) in zip(calls["aux_targets"], calls["forward_aux"]):
        assert targets[-1] is None  # attn_masks: only with use_zero_padding
        out["aux"].append({**{n: t.clone() for n, t in zip(names, targets)}, "layers_cls": cls.clone(),
                           "layers_boxes": boxes.clone()})
    sampling = lambda r: {"pos_inds": r.pos_inds.clone(), "neg_inds": r.neg_inds.clone(),  # noqa: E731
                          "pos_assigned_gt_inds": r.pos_assigned_gt_inds.clone()}
    out["sampling"] = {"rpn": [sampling(r) for r in calls["rpn_sample"]],
                       "rcnn": [sampling(r) for r in calls["roi_sample"]],
                       "atss_gt_inds": [r.gt_inds.clone() for r in calls["atss_assign"]]}
    out["losses"] = {k: detached(v) for k, v in losses.items()}
    perms = [d for d in rec.draws if d["fn"] == "randperm"]
    assert all(len(d["value"]) <= 2**15 for d in perms), "randperm draws are stored as int16"
    out["randperm"] = [{"phase": d["phase"], "perm": d["value"].to(torch.int16)} for d in perms]
    out["random_calls"] = {fn: sum(d["fn"] == fn for d in rec.draws)
                           for fn in ("randperm", "rand_like", "randint_like")}
    return out


def record_predict(model, images: Tensor, samples: list, codetr) -> dict:
    nms_module = sys.modules[codetr.__name__ + ".co_dino_head"]
    with Recorder() as rec, torch.no_grad():
        rec.wrap(nms_module, "batched_nms", "nms", with_args=True)
        rec.wrap(model.query_head, "forward", "head")
        results = model.predict(images, copy.deepcopy(samples), rescale=True)
    threshold = model.query_head.test_cfg.nms.iou_threshold
    layers_cls, layers_boxes = rec.calls["head"][0][:2]
    before, margins = [], []
    for image, ((boxes, scores, labels, _), _) in enumerate(rec.calls["nms"]):
        assert torch.equal(scores, layers_cls[-1, image].sigmoid().flatten().topk(MAX_PER_IMG).values)
        before.append({"scores": scores.clone(), "labels": labels.clone(), "bboxes": boxes.clone()})
        margins.append(iou_margin(boxes, labels, threshold))
    predictions = [{"scores": r.pred_instances.scores, "labels": r.pred_instances.labels,
                    "bboxes": r.pred_instances.bboxes} for r in results]
    return {"predictions": predictions, "predictions_before_nms": before,
            "predict_last_layer": {"cls": layers_cls[-1].clone(), "boxes": layers_boxes[-1].clone()},
            "pre_nms_margin": smallest_gap(layers_cls[-1].sigmoid().flatten(1), MAX_PER_IMG + 1),
            "score_margin": min(deformable.smallest_gap(p["scores"][None]) for p in predictions),
            "nms_iou_margin": min(margins)}


def soft_nms_cases() -> list[dict]:
    """mmcv batched_nms with soft_nms on clustered random boxes (10 of 50 repeat earlier ones, 5 exactly)."""
    from mmcv.ops import batched_nms

    g = torch.Generator().manual_seed(1)
    cases = []
    for num_classes, threshold in ((2, 0.8), (3, 0.8), (3, 0.5)):
        xy = torch.rand(40, 2, generator=g) * 60
        boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 30 + 5], 1)
        copies = boxes[:10].clone()
        copies[5:] += torch.rand(5, 4, generator=g) * 2
        boxes = torch.cat([boxes, copies])
        scores = torch.rand(50, generator=g) * 0.9 + 0.05
        idxs = torch.randint(0, num_classes, (50,), generator=g)
        idxs[40:] = idxs[:10]
        dets, keep = batched_nms(boxes, scores, idxs, dict(type="soft_nms", iou_threshold=threshold))
        cases.append({"boxes": boxes, "scores": scores, "idxs": idxs, "iou_threshold": threshold,
                      "dets": dets, "keep": keep, "iou_margin": iou_margin(boxes, idxs, threshold)})
    return cases


def layout(model: torch.nn.Module) -> list[dict]:
    first_of_storage, entries = {}, []
    for key, tensor in model.state_dict().items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        entries.append({"key": key, "shape": tuple(tensor.shape), "alias_of": first_of_storage.get(storage)})
        first_of_storage.setdefault(storage, key)
    return entries


def full_size_layouts(projects: Path) -> dict[str, list[dict]]:
    """The released models' state-dict layouts (no values): what the model zoo's checkpoints hold."""
    from mmdet.registry import MODELS

    layouts = {}
    for name, config_file in (("r50", CONFIG), ("swin_l", SWIN_CONFIG)):
        cfg = released_model_cfg(projects, config_file)
        layouts[name] = layout(MODELS.build(cfg))
    return layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--projects", type=Path,
                        default=Path(os.environ.get("CODETR_MMDET_PROJECTS", "/tmp/masa_src/projects")))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    codetr = load_codetr(args.projects)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    cfg = build_small_cfg(args.projects)
    model = MODELS.build(copy.deepcopy(cfg))
    values, records = deformable.filled_state_dict(model)
    model.load_state_dict(values, strict=True)
    images, samples, inputs = make_batch(seed=0)
    model.train()  # the backbone's BatchNorm stays in eval mode (norm_eval=True); every dropout is 0
    fixture = record_loss(model, images, samples)
    model.eval()
    fixture.update(record_predict(model, images, samples, codetr))
    fixture.update(
        config={"config_file": CONFIG, "embed_dims": EMBED_DIMS, "ffn_dim": FFN_DIM, "num_heads": 8, "num_points": 4,
                "num_levels": 5, "encoder_layers": ENCODER_LAYERS, "decoder_layers": DECODER_LAYERS,
                "num_query": NUM_QUERY, "num_classes": NUM_CLASSES, "num_dn_queries": NUM_DN_QUERIES,
                "label_noise_scale": 0.5, "box_noise_scale": 1.0, "max_per_img": MAX_PER_IMG,
                "nms": {"type": "soft_nms", "iou_threshold": 0.8, "min_score": 1e-3, "method": "linear", "sigma": 0.5},
                "roi_fc": ROI_FC, "backbone_depth": 18, "pos_temperature": 20, "with_coord_feat": False,
                "num_co_heads": 2, "max_pos_coords": model.query_head.max_pos_coords,
                "use_zero_padding": model.query_head.use_zero_padding},
        mmdet_model_cfg=cfg.to_dict(),
        weights=records,
        inputs=inputs,
        soft_nms_cases=soft_nms_cases(),
    )
    path = args.out / "co_dino.pt"
    torch.save(fixture, path)
    torch.save(full_size_layouts(args.projects), args.out / "co_dino_r50_layout.pt")
    margins = {k: fixture[k] for k in ("topk_margin", "pre_nms_margin", "score_margin", "nms_iou_margin")}
    print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB, margins {margins}")
    print("losses", {k: round(float(sum(v) if isinstance(v, list) else v), 5) for k, v in fixture["losses"].items()})
    print("randperm", [(p["phase"], len(p["perm"])) for p in fixture["randperm"]], fixture["random_calls"])


if __name__ == "__main__":
    main()
