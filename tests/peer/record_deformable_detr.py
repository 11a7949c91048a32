"""Record mmdetection 3.3's whole DeformableDETR detector (plain, refine, refine + two-stage) on one batch.

Run by hand in the peer venv (never by CI, never imported by tests):

    ~/.cache/codetr-peer/venv/bin/python tests/peer/record_deformable_detr.py

Each variant starts from mmdet's own config file (`VARIANTS`), shrunk (ResNet-18, 2 encoder / 3 decoder
layers, FFN 128, 20 queries, 6 classes, dropout 0 so that the training forward equals the inference
one) and runs on a batch of two images of different sizes, zero-padded to a common shape, with 3 and 2
ground-truth boxes. mmdet's two-stage proposal embedding hard-codes 128 sine features per coordinate,
so two-stage keeps embed_dims 256; the others use 64.

Weights. A ResNet-18 alone is 45 MB, so the fixture does not store weights: every tensor of the mmdet
state dict is `hashed_uniform(numel, seed) * scale + shift`, a pure-integer hash that is bit-identical on
every platform and torch version; the fixture stores each key's shape, seed, scale and shift (the
scales are chosen per kind of tensor below so that activations stay O(1) and sampling offsets span
several pixels) plus a float64 sum per tensor, which the test checks after regenerating. Keys of
modules that mmdet shares (the prediction branches without box refine) alias the first key of their
group, exactly as `state_dict()` lists one shared module under every index.

Also writes tests/fixtures/peer/deformable_detr_r50_layouts.pt: each variant's full-size state-dict
layout (keys, shapes and which keys alias a shared module; no values), as the model zoo's checkpoints
have it, for the converter's architecture reading.

Writes tests/fixtures/peer/deformable_detr_{plain,refine,twostage_refine}.pt (torch.save of plain
tensors, dicts and lists):
  - "variant": with_box_refine / as_two_stage / num_queries / num_classes / max_per_img and the config
    file it came from; "weights": [{key, shape, dtype, seed, scale, shift, alias_of, sum}] in
    state-dict order (dtype int64 entries are BatchNorm counters, regenerated as 0);
  - "inputs": images [B, 3, H, W] (padded batch, already normalised), img_shapes [B, 2] (h, w) valid,
    ori_shapes [B, 2], scale_factors [B, 2] (w, h) as mmdet uses them, gt_bboxes per image [N, 4] xyxy
    pixels of the resized image, gt_labels per image [N];
  - "memory" [B, S, C] (encoder output), and for the plain variant "neck" (4 maps [B, C, H_l, W_l]);
  - "init_reference" [B, Q, 2] learned reference points (single-stage) or [B, Q, 4] the selected top-k
    proposals (two-stage, sigmoid of the detached box logits); two-stage also "enc_cls" [B, S, K],
    "enc_boxes" [B, S, 4] (cxcywh normalised), "topk_indices" [B, Q] and "topk_margin" (the smallest gap
    between consecutive class-0 scores among the top Q + 1 of each image: how far the selection is from
    a tie);
  - "layers_cls" [L, B, Q, K] and "layers_boxes" [L, B, Q, 4] cxcywh normalised, every decoder layer as
    mmdet's head returns it;
  - "losses": mmdet's loss dict (weighted by its loss_weight: cls 2, bbox 5, iou 2);
  - "predictions": per image {scores, labels, bboxes xyxy in original-image pixels} (model.predict with
    rescale=True) and "score_margin" (smallest gap between consecutive kept scores).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

OUT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "peer"
VARIANTS = {
    # name: (mmdet config file, embed_dims, num_points)
    "plain": ("deformable-detr_r50_16xb2-50e_coco.py", 64, 2),
    "refine": ("deformable-detr-refine_r50_16xb2-50e_coco.py", 64, 4),
    "twostage_refine": ("deformable-detr-refine-twostage_r50_16xb2-50e_coco.py", 256, 4),
}
NUM_QUERIES = 20
NUM_CLASSES = 6
MAX_PER_IMG = 30
FFN_DIM = 128
ENCODER_LAYERS, DECODER_LAYERS = 2, 3
BATCH_HW = (100, 100)
IMG_SHAPES = [(76, 100), (100, 68)]  # valid (h, w) of each image inside the padded batch
ORI_SHAPES = [(152, 200), (120, 82)]  # the original sizes the images were resized from
GT_BBOXES = [  # xyxy pixels of the resized image
    [[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 96.0, 70.0], [60.0, 40.0, 72.0, 52.0]],
    [[10.0, 8.0, 60.0, 44.0], [2.0, 50.0, 30.0, 98.0]],
]
GT_LABELS = [[1, 4, 0], [5, 1]]


def hashed_uniform(numel: int, seed: int) -> Tensor:
    """numel float32 values in [-1, 1) from integer hashing: bit-identical on every platform and torch
    version (int64 multiply, modulo and xor only). The test regenerates weights with the same function."""
    h = torch.arange(numel, dtype=torch.int64) + seed * 1_000_003
    for _ in range(3):
        h = (h * 1103515245 + 12345) % 2**31
        h = h ^ (h >> 16)
    return (h.double() / 2**30 - 1).float()


def fill_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(scale, shift) of a tensor: value = hashed_uniform * scale + shift."""
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    uniform_std = 3**0.5  # uniform(-1, 1) * sqrt(3) / sqrt(fan_in) has std 1 / sqrt(fan_in)
    if key.endswith("running_var"):
        return 0.5, 1.0
    if key.endswith("running_mean"):
        return 0.1, 0.0
    if "sampling_offsets" in key:  # offsets of a few pixels (points), some leaving the map
        return (2.0 * uniform_std / fan_in**0.5, 0.0) if key.endswith("weight") else (3.0, 0.0)
    if key.startswith("bbox_head.cls_branches") and key.endswith("bias"):
        return 0.5, -2.0  # scores around sigmoid(-2): focal losses and top-k in a sensitive range
    if key == "level_embed" or key == "query_embedding.weight":
        return uniform_std, 0.0
    if len(shape) == 4:  # convolutions: He (ReLU) scaling keeps the ResNet's activations O(1)
        return 6**0.5 / fan_in**0.5, 0.0
    if len(shape) == 2:  # linear layers, attention in_proj
        return uniform_std / fan_in**0.5, 0.0
    if key.endswith("weight"):  # BatchNorm, GroupNorm, LayerNorm scales
        return 0.2, 1.0
    return 0.1, 0.0  # biases


def filled_state_dict(model: torch.nn.Module) -> tuple[dict[str, Tensor], list[dict]]:
    """(state dict to load, fixture records). Keys sharing storage (one module listed under several
    names) get the first key's values."""
    records, values, first_of_storage = [], {}, {}
    for seed, (key, tensor) in enumerate(model.state_dict().items()):
        shape = tuple(tensor.shape)
        record = {"key": key, "shape": shape, "dtype": str(tensor.dtype).replace("torch.", ""), "seed": seed,
                  "scale": 0.0, "shift": 0.0, "alias_of": None}
        storage = (tensor.data_ptr(), shape)
        if tensor.dtype == torch.int64:  # BatchNorm's num_batches_tracked
            values[key] = torch.zeros(shape, dtype=torch.int64)
        elif storage in first_of_storage:
            record["alias_of"] = first_of_storage[storage]
            values[key] = values[record["alias_of"]]
        else:
            first_of_storage[storage] = key
            record["scale"], record["shift"] = fill_rule(key, shape)
            values[key] = (hashed_uniform(tensor.numel(), seed) * record["scale"] + record["shift"]).view(shape)
        record["sum"] = float(values[key].double().sum())
        records.append(record)
    return values, records


def build_config(config_file: str, embed_dims: int, num_points: int):
    import mmdet
    from mmengine.config import Config

    path = Path(mmdet.__file__).parent / ".mim" / "configs" / "deformable_detr" / config_file
    cfg = Config.fromfile(str(path)).model
    cfg.num_queries = NUM_QUERIES
    cfg.backbone.depth = 18
    cfg.backbone.init_cfg = None
    cfg.neck.in_channels = [128, 256, 512]
    cfg.neck.out_channels = embed_dims
    for part, num_layers in (("encoder", ENCODER_LAYERS), ("decoder", DECODER_LAYERS)):
        cfg[part].num_layers = num_layers
        layer = cfg[part].layer_cfg
        layer.ffn_cfg.update(embed_dims=embed_dims, feedforward_channels=FFN_DIM, ffn_drop=0.0)
        layer.self_attn_cfg.update(embed_dims=embed_dims, dropout=0.0)
        if part == "encoder":
            layer.self_attn_cfg.num_points = num_points
        else:
            layer.cross_attn_cfg.update(embed_dims=embed_dims, num_points=num_points, dropout=0.0)
    cfg.positional_encoding.num_feats = embed_dims // 2
    cfg.bbox_head.update(num_classes=NUM_CLASSES, embed_dims=embed_dims)
    cfg.test_cfg.max_per_img = MAX_PER_IMG
    return cfg


def make_batch(seed: int, batch_hw=BATCH_HW, img_shapes=IMG_SHAPES, ori_shapes=ORI_SHAPES, gt_bboxes=GT_BBOXES,
               gt_labels=GT_LABELS):
    """(padded images, mmdet data samples, the fixture's "inputs") for images of valid sizes `img_shapes`
    inside one `batch_hw` batch, resized from `ori_shapes`, with their ground truth (xyxy pixels)."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(len(img_shapes), 3, *batch_hw)
    samples = []
    for i, ((h, w), (oh, ow)) in enumerate(zip(img_shapes, ori_shapes)):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)  # padding stays 0, as mmdet pads
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(oh, ow), pad_shape=(h, w),
                                             batch_input_shape=batch_hw, scale_factor=(w / ow, h / oh)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor(gt_bboxes[i]), labels=torch.tensor(gt_labels[i]))
        samples.append(sample)
    inputs = {
        "images": images,
        "img_shapes": torch.tensor(img_shapes),
        "ori_shapes": torch.tensor(ori_shapes),
        "scale_factors": torch.tensor([s.scale_factor for s in samples]),
        "gt_bboxes": [torch.tensor(b) for b in gt_bboxes],
        "gt_labels": [torch.tensor(l) for l in gt_labels],
    }
    return images, samples, inputs


def smallest_gap(sorted_desc: Tensor) -> float:
    """Smallest difference between consecutive values of each row of a descending-sorted [B, K]."""
    return float((sorted_desc[:, :-1] - sorted_desc[:, 1:]).min())


@torch.no_grad()
def record_forward(model, images: Tensor, samples: list) -> dict:
    """Every stage of mmdet's forward, as DeformableDETR.forward_transformer chains them."""
    out: dict = {}
    feats = model.extract_feat(images)
    encoder_inputs, decoder_inputs = model.pre_transformer(feats, samples)
    encoder_outputs = model.forward_encoder(**encoder_inputs)
    out["memory"] = encoder_outputs["memory"]
    more_decoder_inputs, head_inputs = model.pre_decoder(**encoder_outputs)
    decoder_inputs.update(more_decoder_inputs)
    out["init_reference"] = decoder_inputs["reference_points"]
    if model.as_two_stage and model.training:  # mmdet returns the proposals' scores only when training
        enc_cls = head_inputs["enc_outputs_class"]
        out["enc_cls"], out["enc_boxes"] = enc_cls, head_inputs["enc_outputs_coord"]
        top = enc_cls[..., 0].topk(model.num_queries + 1, dim=1)
        out["topk_indices"] = top.indices[:, :-1]
        out["topk_margin"] = smallest_gap(top.values)
    elif not model.as_two_stage:
        out["neck"] = list(feats)
    decoder_outputs = model.forward_decoder(**decoder_inputs)
    layers_cls, layers_boxes = model.bbox_head(decoder_outputs["hidden_states"], decoder_outputs["references"])
    out["layers_cls"], out["layers_boxes"] = layers_cls, layers_boxes
    return out


def record_variant(name: str, config_file: str, embed_dims: int, num_points: int) -> dict:
    from mmdet.registry import MODELS

    model = MODELS.build(build_config(config_file, embed_dims, num_points))
    values, records = filled_state_dict(model)
    model.load_state_dict(values, strict=True)
    images, samples, inputs = make_batch(seed=0)

    # mmdet hands the encoder proposals to the head only in training mode; with every dropout 0 and the
    # backbone's BatchNorm in eval mode (norm_eval=True) the training forward is the inference one
    model.train()
    fixture = record_forward(model, images, samples)
    model.eval()
    assert torch.equal(record_forward(model, images, samples)["layers_cls"], fixture["layers_cls"])
    with torch.no_grad():
        results = model.predict(images, copy.deepcopy(samples), rescale=True)
    predictions = [{"scores": r.pred_instances.scores, "labels": r.pred_instances.labels,
                    "bboxes": r.pred_instances.bboxes} for r in results]
    model.train()
    with torch.no_grad():
        losses = {k: v.detach() for k, v in model.loss(images, copy.deepcopy(samples)).items()}

    fixture.update(
        variant={"name": name, "config_file": config_file, "with_box_refine": model.with_box_refine,
                 "as_two_stage": model.as_two_stage, "num_queries": model.num_queries,
                 "num_classes": NUM_CLASSES, "max_per_img": MAX_PER_IMG, "embed_dims": embed_dims,
                 "num_points": num_points},
        weights=records,
        inputs=inputs,
        losses=losses,
        predictions=predictions,
        score_margin=min(smallest_gap(p["scores"][None]) for p in predictions),
    )
    return fixture


def full_size_layouts() -> dict[str, list[dict]]:
    """Per variant, the unmodified config's (ResNet-50, 6 + 6 layers, 300 queries, 80 classes) state-dict
    layout: [{key, shape, alias_of}], no values. The model zoo's checkpoints have this layout."""
    import mmdet
    from mmdet.registry import MODELS
    from mmengine.config import Config

    layouts = {}
    for name, (config_file, _, _) in VARIANTS.items():
        cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / "deformable_detr" / config_file))
        cfg.model.backbone.init_cfg = None
        first_of_storage, layout = {}, []
        for key, tensor in MODELS.build(cfg.model).state_dict().items():
            storage = (tensor.data_ptr(), tuple(tensor.shape))
            layout.append({"key": key, "shape": tuple(tensor.shape), "alias_of": first_of_storage.get(storage)})
            first_of_storage.setdefault(storage, key)
        layouts[name] = layout
    return layouts


def main() -> None:
    from mmdet.utils import register_all_modules

    register_all_modules()
    torch.set_num_threads(1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(full_size_layouts(), OUT_DIR / "deformable_detr_r50_layouts.pt")
    for name, (config_file, embed_dims, num_points) in VARIANTS.items():
        fixture = record_variant(name, config_file, embed_dims, num_points)
        path = OUT_DIR / f"deformable_detr_{name}.pt"
        torch.save(fixture, path)
        margins = {k: fixture[k] for k in ("topk_margin", "score_margin") if k in fixture}
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB, losses "
              f"{ {k: round(float(v), 4) for k, v in fixture['losses'].items()} }, margins {margins}")


if __name__ == "__main__":
    main()
