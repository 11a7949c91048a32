"""The mmdetection 3.3 benchmark peer: seconds per training iteration or per inference batch, and peak
memory, of mmdet's two-stage + box-refine DeformableDETR (ResNet-50, no pretrained weights) on a batch
that bench/bench_detector.py made and saved, so that it reads the very tensor codetr and HF read.

It runs only inside the mmdetection peer venv (mmdet 3.3.0, mmcv 2.1.0, mmengine; no codetr), which
../shared/peer/build_mmdet_peer.sh builds; bench_detector.py starts it once per mode:

    python bench/bench_detector.py --preset deformable_detr_pp_r50_1x --size 800x1216 --mmdet ~/.cache/codetr-peer/venv
    VENV/bin/python bench/mmdet_peer.py --batch-file BATCH.pt --mode train --iters 3 --warmup 1

BATCH.pt is torch.save((images [B, 3, H, W] already normalised, masks [B, H, W], targets [{"boxes" [N, 4]
cxcywh normalised, "labels" [N]}])). The model is mmdet's
deformable-detr-refine-twostage_r50_16xb2-50e_coco.py with `--num-classes` classes, 300 queries, the
encoder's and decoder's FFN width `--ffn-dim`, and the config's frozen backbone stages. The images go
straight to model.loss / model.predict (no data preprocessor). Train: loss -> parse_losses -> backward ->
clip_grad_norm_(0.1) -> AdamW(lr 2e-4, wd 1e-4) step; infer: predict under no_grad. It prints
`RESULT {"seconds", "per_image", "images_per_s", "peak_mb"}`: the median over `--iters` timed runs after
`--warmup` untimed ones; peak memory is torch.cuda.max_memory_allocated on CUDA (reset after warm-up),
else the process's peak RSS (ru_maxrss), as codetr.engine.memory.peak_memory_mb measures it.
`--device cuda` needs mmcv built with its CUDA ops (FORCE_CUDA=1 on a machine with nvcc): the build
script compiles CPU ops only, and mmcv's deformable attention takes its compiled kernel for CUDA tensors.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

CONFIG = Path("deformable_detr") / "deformable-detr-refine-twostage_r50_16xb2-50e_coco.py"
NUM_QUERIES = 300


def build_model(num_classes: int, ffn_dim: int, dropout: float) -> torch.nn.Module:
    import mmdet
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / CONFIG)).model
    cfg.num_queries = NUM_QUERIES
    cfg.backbone.init_cfg = None  # no download of torchvision's ImageNet weights
    cfg.bbox_head.num_classes = num_classes
    cfg.encoder.layer_cfg.ffn_cfg.feedforward_channels = ffn_dim
    cfg.decoder.layer_cfg.ffn_cfg.feedforward_channels = ffn_dim
    for layer in (cfg.encoder.layer_cfg, cfg.decoder.layer_cfg):  # the config's 0.1 everywhere, or --dropout
        layer.ffn_cfg.ffn_drop = dropout
        for attention in ("self_attn_cfg", "cross_attn_cfg"):
            if attention in layer:
                layer[attention].dropout = dropout
    model = MODELS.build(cfg)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every tensor at INFO
    model.init_weights()
    return model


def data_samples(targets: list[dict[str, Tensor]], height: int, width: int) -> list:
    """Our targets (cxcywh normalised) as mmdet DetDataSamples: xyxy pixels, unpadded, unscaled images."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
    from mmengine.structures import InstanceData

    shape = (height, width)
    metainfo = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                    scale_factor=(1.0, 1.0))
    pixels = torch.tensor([width, height, width, height], dtype=torch.float32)
    samples = []
    for target in targets:
        boxes = bbox_cxcywh_to_xyxy(target["boxes"]) * pixels.to(target["boxes"].device)
        sample = DetDataSample(metainfo=metainfo)
        sample.gt_instances = InstanceData(bboxes=boxes, labels=target["labels"])
        samples.append(sample)
    return samples


def train_step(model: torch.nn.Module, images: Tensor, samples: list) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    model.train()

    def step() -> None:
        loss, _ = model.parse_losses(model.loss(images, samples))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    return step


def infer_step(model: torch.nn.Module, images: Tensor, samples: list) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model.predict(images, samples)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds(step: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def time_step(step: Callable[[], None], device: torch.device, iters: int, warmup: int, batch: int) -> dict:
    """`warmup` untimed runs, a fresh CUDA peak, then the median of `iters` timed runs."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    median = sorted(seconds(step, device) for _ in range(iters))[iters // 2]
    return {"seconds": median, "per_image": median / batch, "images_per_s": batch / median,
            "peak_mb": peak_memory_mb(device)}


def require_cuda_ops(device: torch.device) -> None:
    from mmcv.ops import get_compiling_cuda_version

    if device.type == "cuda" and get_compiling_cuda_version() == "not available":
        raise SystemExit("mmdet_peer.py --device cuda: this venv's mmcv has no CUDA ops (rebuild it with FORCE_CUDA=1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-file", type=Path, required=True, help="torch.save((images, masks, targets))")
    parser.add_argument("--mode", choices=("train", "infer"), required=True)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--ffn-dim", type=int, default=2048, help="encoder and decoder FFN width")
    parser.add_argument("--dropout", type=float, default=0.1, help="every dropout of the transformer")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    require_cuda_ops(device)
    images, _, targets = torch.load(args.batch_file, weights_only=True)
    images = images.to(device)
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    torch.manual_seed(0)
    model = build_model(args.num_classes, args.ffn_dim, args.dropout).to(device)
    samples = data_samples(targets, *images.shape[-2:])
    make_step = train_step if args.mode == "train" else infer_step
    result = time_step(make_step(model, images, samples), device, args.iters, args.warmup, len(images))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
